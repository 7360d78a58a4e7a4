#!/usr/bin/env bash
# The GPU check: one command for the day a CUDA GPU is available (meant to fit in 8 minutes on one H100-class GPU;
# nobody has run it on one yet). Three steps, each writing JSON under one output folder:
#
#   1. bench_gnnmoe.json  benchmarks/bench_gnnmoe.py in bf16: every setting (the default config and every router,
#                         LoRA and PEFT's LoKr as baselines, the expert-scaling table), time, FLOPs and peak memory
#   2. dg/                the DG real tier (DINOv2 ViT-S/14) for 100 steps: GNN-MoE, LoRA and LoKr, one held-out domain
#   3. avsr/              a short run of the AVSR real tier (Whisper tiny.en + SmolLM2-135M, ASR): 100 steps, decoded
#   summary.json          what ran, with each step's command, wall time and output
#
# Usage (from anywhere; the checkout this script is in is the one that runs):
#   bash benchmarks/gpu_check.sh                        # CUDA, the full check, output runs/gpu_check
#   bash benchmarks/gpu_check.sh --output /tmp/check
#   bash benchmarks/gpu_check.sh --device cpu --quick   # the same steps at smoke size on CPU (the test suite runs it)
#
# --quick shrinks every step (one block and batch 2 in the benchmark, no memory pass; a DG dry run of GNN-MoE; one
# AVSR step on two utterances) so that the commands cannot rot where no GPU is.
set -euo pipefail

device=cuda
quick=0
out=runs/gpu_check
while [[ $# -gt 0 ]]; do
    case "$1" in
        --device) device="${2:?--device needs cuda or cpu}"; shift 2 ;;
        --quick) quick=1; shift ;;
        --output) out="${2:?--output needs a folder}"; shift 2 ;;
        -h | --help) sed -n '2,17p' "$0"; exit 0 ;;
        *) echo "gpu_check.sh: unknown option '$1'; use --device cuda|cpu, --quick, --output DIR" >&2; exit 2 ;;
    esac
done
if [[ "$device" != cuda && "$device" != cpu ]]; then
    echo "gpu_check.sh: --device must be cuda or cpu, got '$device'" >&2
    exit 2
fi

if [[ -d "$out" && -n "$(ls -A "$out")" ]]; then  # the recipes refuse to mix a new run into an old one
    echo "gpu_check.sh: $out is not empty; pass another --output or remove it" >&2
    exit 2
fi
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
cd "$root"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's peft_gnnmoe and recipes
if [[ "$device" == cuda ]]; then
    if ! python -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
        echo "gpu_check.sh: torch sees no CUDA device; on a machine without one run --device cpu --quick" >&2
        exit 1
    fi
    export ACCELERATE_MIXED_PRECISION=bf16  # the recipes' Accelerator trains in bf16 autocast
else
    export CUDA_VISIBLE_DEVICES=""  # the recipes' Accelerator stays on the CPU
    export ACCELERATE_MIXED_PRECISION=no
fi

if [[ $quick == 1 ]]; then
    bench=(--quick --repeats 1 --no-memory)
    dg=(--dry_run --method gnnmoe)
    avsr=(--corpus_train 8 --corpus_test 1 --max_steps 1 --max_batch_size 1 --max_new_tokens 2)
    avsr+=(--no-eval_untrained --no-real_speech_test --test_snrs)
else
    bench=()
    dg=(--test_envs 0 --seeds 0 --max_steps 100 --eval_every 50)
    avsr=(--corpus_train 400 --corpus_test 50 --max_steps 100 --test_snrs 0)
fi

steps_file="$out/steps.jsonl"
: >"$steps_file"
run_step() {  # name, output (relative to $out), command...
    local name="$1" output="$2"
    shift 2
    echo "== gpu_check: $name: $*" >&2
    local start end
    start=$(date +%s.%N)
    "$@"
    end=$(date +%s.%N)
    python - "$name" "$output" "$start" "$end" "$*" >>"$steps_file" <<'PY'
import json, sys
name, output, start, end, command = sys.argv[1:]
print(json.dumps({"step": name, "output": output, "seconds": round(float(end) - float(start), 1), "command": command}))
PY
}

run_step benchmark bench_gnnmoe.json \
    python benchmarks/bench_gnnmoe.py --device "$device" --dtype bf16 --output "$out/bench_gnnmoe.json" "${bench[@]}"
run_step dg dg \
    python -m recipes.dg --tier real --jobs 1 --report_to none --output_dir "$out/dg" "${dg[@]}"
run_step avsr avsr \
    python -m recipes.avsr --real --report_to none --num_beams 1 --output_dir "$out/avsr" "${avsr[@]}"

python - "$out" "$device" "$quick" <<'PY'
import json, os, sys
from pathlib import Path

import torch

out, device, quick = Path(sys.argv[1]), sys.argv[2], sys.argv[3] == "1"
steps = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()]
total = sum(s["seconds"] for s in steps)
summary = {
    "device": device,
    "device_name": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
    "quick": quick,
    "torch": torch.__version__,
    "loadavg": os.getloadavg(),
    "steps": steps,
    "total_seconds": round(total, 1),
    "budget_seconds": 480,
}
(out / "summary.json").write_text(json.dumps(summary, indent=2))
for s in steps:
    print(f"{s['step']:>10}: {s['seconds']:7.1f} s  -> {out / s['output']}")
print(f"{'total':>10}: {total:7.1f} s (budget on one H100-class GPU: 480 s)  -> {out / 'summary.json'}")
if device == "cuda" and not quick and total > 480:
    print("gpu_check: over the 8-minute budget; the step times above say where", file=sys.stderr)
PY

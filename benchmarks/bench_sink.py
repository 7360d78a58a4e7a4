"""Cost of the decorrelation loss: one LoRA training step with and without it, on the same small Llama (CPU).

Variants: ``lora`` = plain ``LoraConfig`` on q/v; ``sink`` = the same LoRA inside ``SinkDecorrelationConfig``
(weight 0.1, all layers). A step is forward + backward + AdamW step on a random-init Llama, inputs with right padding.

* Time: both models live in this process and their steps alternate (lora, sink, lora, sink, ...), so machine noise
  hits both alike; the median and the minimum over ``--steps`` steps after ``--warmup`` are reported (wall clock and
  process CPU time). On a busy machine the minimum is the better estimate of the intrinsic cost; the load average
  during the run is recorded with the results.
* Peak memory, measured two ways:
  - ``peak_rss_delta``: each variant runs in its own fresh subprocess; the high-water mark of the resident set
    (``ru_maxrss``) after the steps minus the RSS just before the first step, i.e. what training adds on top of the
    model (activations, gradients, optimizer state, allocator slack);
  - ``saved_for_backward``: bytes of the distinct tensor storages autograd keeps for backward during one forward
    (``torch.autograd.graph.saved_tensors_hooks``); deterministic, and what the loss could add to the peak.

Writes ``benchmarks/results/bench_sink.json`` and prints a table with the ratios sink / lora (target <= 1.05).

    python benchmarks/bench_sink.py            # ~2 minutes on an idle CPU core
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import psutil
import torch
from peft import LoraConfig, get_peft_model
from tqdm import tqdm
from transformers import AutoModelForCausalLM, LlamaConfig

from peft_gnnmoe import SinkDecorrelationConfig

RESULTS = Path(__file__).parent / "results"
MODEL = dict(
    vocab_size=8192,
    hidden_size=384,
    intermediate_size=1024,
    num_hidden_layers=6,
    num_attention_heads=6,
    num_key_value_heads=2,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)
VARIANTS = ("lora", "sink")


def build(variant: str, seed: int = 0):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**MODEL))
    lora = LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"])
    config = lora if variant == "lora" else SinkDecorrelationConfig(base_config=lora, weight=0.1, layers="all")
    model = get_peft_model(model, config).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    return model, optimizer


def make_batch(batch_size: int, seq_len: int, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, MODEL["vocab_size"], (batch_size, seq_len), generator=generator)
    ids[:, 0] = MODEL["bos_token_id"]
    mask = torch.ones_like(ids)
    for row in range(batch_size):  # right padding of different lengths
        mask[row, seq_len - row * seq_len // (2 * batch_size) :] = 0
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids.masked_fill(mask == 0, 0), "attention_mask": mask, "labels": labels}


def step(model, optimizer, batch) -> None:
    model(**batch).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def saved_for_backward_bytes(model, batch) -> int:
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = model(**batch).loss
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(storages.values())


def time_steps(args) -> dict[str, dict[str, float]]:
    torch.set_num_threads(args.threads)
    models = {v: build(v) for v in VARIANTS}
    batch = make_batch(args.batch_size, args.seq_len)
    wall: dict[str, list[float]] = {v: [] for v in VARIANTS}
    cpu: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for i in tqdm(range(args.warmup + args.steps), desc="timing (alternating variants)"):
        order = VARIANTS if i % 2 == 0 else VARIANTS[::-1]
        for variant in order:
            start_wall, start_cpu = time.perf_counter(), time.process_time()
            step(*models[variant], batch)
            if i >= args.warmup:
                wall[variant].append(time.perf_counter() - start_wall)
                cpu[variant].append(time.process_time() - start_cpu)
    saved = {v: saved_for_backward_bytes(models[v][0], batch) for v in VARIANTS}
    return {
        v: {
            "median_step_s": statistics.median(wall[v]),
            "min_step_s": min(wall[v]),
            "median_step_cpu_s": statistics.median(cpu[v]),
            "min_step_cpu_s": min(cpu[v]),
            "saved_for_backward_mb": saved[v] / 2**20,
        }
        for v in VARIANTS
    }


def memory_child(args) -> None:
    """Runs in a fresh subprocess: one variant, RSS before the first step and the high-water mark after."""
    torch.set_num_threads(args.threads)
    model, optimizer = build(args.child)
    batch = make_batch(args.batch_size, args.seq_len)
    before = psutil.Process().memory_info().rss
    for _ in range(args.memory_steps):
        step(model, optimizer, batch)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    print(
        json.dumps(
            {
                "rss_before_mb": before / 2**20,
                "peak_rss_mb": peak / 2**20,
                "peak_rss_delta_mb": (peak - before) / 2**20,
            }
        )
    )


def measure_memory(args) -> dict[str, dict[str, float]]:
    results = {}
    for variant in tqdm(VARIANTS, desc="peak RSS (one subprocess each)"):
        command = [
            sys.executable,
            __file__,
            "--child",
            variant,
            "--threads",
            str(args.threads),
            "--batch-size",
            str(args.batch_size),
            "--seq-len",
            str(args.seq_len),
            "--memory-steps",
            str(args.memory_steps),
        ]
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        results[variant] = json.loads(output.strip().splitlines()[-1])
    return results


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=12, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--memory-steps", type=int, default=3)
    parser.add_argument("--output", default=str(RESULTS / "bench_sink.json"))
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        memory_child(args)
        return {}

    load_before = os.getloadavg()
    timing, memory = time_steps(args), measure_memory(args)
    rows = {v: {**timing[v], **memory[v]} for v in VARIANTS}
    metrics = (
        "median_step_s",
        "min_step_s",
        "median_step_cpu_s",
        "min_step_cpu_s",
        "peak_rss_delta_mb",
        "saved_for_backward_mb",
    )
    ratios = {m: rows["sink"][m] / rows["lora"][m] for m in metrics}
    print(f"\n{'metric':<24}{'lora':>10}{'sink':>10}{'ratio':>8}")
    for metric in metrics:
        print(f"{metric:<24}{rows['lora'][metric]:>10.3f}{rows['sink'][metric]:>10.3f}{ratios[metric]:>8.3f}")
    result = {
        "model": MODEL,
        "batch": {"batch_size": args.batch_size, "seq_len": args.seq_len},
        "steps": args.steps,
        "threads": args.threads,
        "load_average_1min": {"before": load_before[0], "after": os.getloadavg()[0]},
        "variants": rows,
        "ratios_sink_over_lora": ratios,
        "torch": torch.__version__,
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.output}")
    return result


if __name__ == "__main__":
    main()

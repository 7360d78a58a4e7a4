"""Training-step time and peak memory of GNN-MoE (each router) against PEFT LoRA and PEFT LoKr, in one run.

Every variant adapts the same ViT (ViT-B/16 shape, fewer blocks, random init, 224 px, CPU) and runs in its own
subprocess, so that peak memory is measured in isolation: the peak resident set size over the steps minus the
resident size before the first one (activations, gradients and autograd buffers).
A second part times one adapted 768x768 layer: GNN-MoE's factored Kronecker expert against PEFT LoKr's layer (which
builds the Kronecker product every call) at the same factor shapes.

    python benchmarks/bench_gnnmoe.py                # full run (~3-5 min on 2 cores)
    python benchmarks/bench_gnnmoe.py --layers 2 --steps 2 --batch 8   # quicker

Writes benchmarks/results/gnnmoe_bench.json and prints a Markdown table with ratios to LoRA.
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

import torch

RESULTS = Path(__file__).parent / "results"

# GNN-MoE at a trainable-parameter budget no larger than LoRA r=8 on the same q/k/v layers
GNNMOE_BUDGET = dict(num_experts=4, top_k=2, kron_factor=4, kron_rank=1, router_hidden=16, expert_bias=False)


def _vit(layers: int):
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    config = ViTConfig(
        hidden_size=768,
        num_hidden_layers=layers,
        num_attention_heads=12,
        intermediate_size=3072,
        image_size=224,
        patch_size=16,
        num_labels=10,
    )
    return ViTForImageClassification(config)


def _peft_config(variant: str):
    from peft import LoKrConfig, LoraConfig

    from peft_gnnmoe import GNNMoEConfig

    targets = ["q_proj", "k_proj", "v_proj"]
    if variant == "lora":
        return LoraConfig(r=8, lora_alpha=16, target_modules=targets, modules_to_save=["classifier"])
    if variant == "lokr":
        return LoKrConfig(r=8, alpha=16, target_modules=targets, modules_to_save=["classifier"])
    router = variant.split("-")[1]
    budget = dict(GNNMOE_BUDGET, router_hidden=8) if router == "sage" else GNNMOE_BUDGET  # SAGE has two Linears
    return GNNMoEConfig(router=router, target_modules=targets, modules_to_save=["classifier"], **budget)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run_variant(variant: str, layers: int, batch: int, steps: int) -> dict:
    """Time `steps` forward+backward steps (after one warm-up) and measure the peak memory they add."""
    from peft import get_peft_model

    import peft_gnnmoe  # noqa: F401  (registers the tuner)

    model = get_peft_model(_vit(layers), _peft_config(variant)).train()
    trainable = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "classifier" not in n)
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randn(batch, 3, 224, 224, generator=generator)
    labels = torch.randint(0, 10, (batch,), generator=generator)

    def step():
        model.zero_grad(set_to_none=True)
        model(pixel_values=pixels, labels=labels).loss.backward()

    rss_before = _rss_bytes()  # before the first step: its allocations count, later steps may reuse them
    step()  # warm-up
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "variant": variant,
        "trainable_params": trainable,
        "step_s": statistics.median(times),
        "peak_extra_mb": max(peak - rss_before, 0) / 2**20,
    }


def time_layers(tokens: int, repeats: int) -> dict:
    """One 768x768 layer, forward+backward: PEFT LoKr's layer vs frozen Linear + one factored Kronecker expert."""
    from peft import LoKrConfig, get_peft_model

    from peft_gnnmoe.tuners.gnnmoe.kronecker import init_kron_experts, kron_moe_forward

    torch.manual_seed(0)
    dim, factor, rank = 768, 4, 8
    lokr = get_peft_model(
        torch.nn.Sequential(torch.nn.Linear(dim, dim)),
        LoKrConfig(r=rank, target_modules=["0"], decompose_factor=factor, init_weights=False),
    )
    base = torch.nn.Linear(dim, dim).requires_grad_(False)
    expert = {k: v.requires_grad_() for k, v in init_kron_experts(dim, dim, 1, factor, rank, False).items()}
    x = torch.randn(tokens, dim)
    gates = torch.ones(tokens, 1)

    def ours():
        y = base(x) + kron_moe_forward(x, gates, expert["rules"], expert["left"], expert["right"], expert["bias"])
        y.sum().backward()

    def theirs():
        lokr(x).sum().backward()

    result = {}
    for name, fn in (("kron_expert", ours), ("lokr_layer", theirs)):
        fn()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        result[name] = statistics.median(times)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4, help="ViT-B/16 blocks (the real model has 12)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per variant (median reported)")
    parser.add_argument("--variants", nargs="+", default=["lora", "lokr", "gnnmoe-gcn", "gnnmoe-gat", "gnnmoe-sage"])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        print(json.dumps(run_variant(args.worker, args.layers, args.batch, args.steps)))
        return

    rows = []
    for variant in args.variants:
        cmd = [
            sys.executable,
            __file__,
            "--worker",
            variant,
            "--layers",
            str(args.layers),
            "--batch",
            str(args.batch),
            "--steps",
            str(args.steps),
        ]
        print(f"running {variant} ...", file=sys.stderr, flush=True)
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    lora = next(r for r in rows if r["variant"] == "lora")
    for r in rows:
        r["time_vs_lora"] = r["step_s"] / lora["step_s"]
        r["memory_vs_lora"] = r["peak_extra_mb"] / lora["peak_extra_mb"]
        r["params_vs_lora"] = r["trainable_params"] / lora["trainable_params"]
    layer = time_layers(tokens=args.batch * 197, repeats=10)

    threads = torch.get_num_threads()
    print(
        f"\nViT-B/16 shape, {args.layers} blocks, batch {args.batch}, 224 px, CPU ({threads} threads); "
        "q/k/v adapted; GNN-MoE "
        + ", ".join(f"{k}={v}" for k, v in GNNMOE_BUDGET.items())
        + " (router_hidden=8 for SAGE)"
    )
    print("\n| method | trainable params | step (s) | × LoRA time | peak extra MB | × LoRA memory |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['variant']} | {r['trainable_params']:,} | {r['step_s']:.2f} | {r['time_vs_lora']:.2f} | "
            f"{r['peak_extra_mb']:.0f} | {r['memory_vs_lora']:.2f} |"
        )
    print(
        f"\nOne 768x768 layer, {args.batch * 197} tokens, forward+backward: factored Kronecker expert "
        f"{layer['kron_expert'] * 1e3:.1f} ms vs PEFT LoKr layer {layer['lokr_layer'] * 1e3:.1f} ms "
        f"(× {layer['kron_expert'] / layer['lokr_layer']:.2f})"
    )
    RESULTS.mkdir(exist_ok=True)
    out = {
        "config": vars(args) | {"gnnmoe": GNNMOE_BUDGET, "threads": torch.get_num_threads()},
        "models": rows,
        "layer": layer,
    }
    (RESULTS / "gnnmoe_bench.json").write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()

"""What GNN-MoE costs users against PEFT LoRA (and LoKr): training step and inference, four settings, one command.

Settings (random inputs; the ViT shapes are randomly initialised):

* ``tiny``: the embedded backbone ``assets/vit-tiny-fashion-contours`` (64 wide, 7x7 patches), q/k/v, batch 24,
  LoRA r=4 (as the DG recipe) vs the default ``GNNMoEConfig`` for every router.
* ``vits``: ViT-S/16 shape (384 wide, 4 blocks, 224 px), batch 8, q/k/v/o/fc1/fc2, LoRA r=8 vs the default config.
* ``vitb``: ViT-B/16 shape (768 wide, 4 blocks, 224 px), batch 8, q/k/v, LoRA r=8 and PEFT LoKr r=8 vs the
  param-matched budget config (``GNNMOE_BUDGET``; ``router_hidden=8`` for SAGE, which has two Linears).
* ``scaling``: expert scaling on the ViT-S/16 shape (4 blocks, 224 px, batch 8, q/k/v), LoRA r=8 vs the default
  config (GCN, top-2) with 4, 8, 16 and 32 experts, each as the tuner picks its order (``expert_dispatch="auto"``)
  and with every expert on every token (``"dense"``, variants ``...-dense``).

Variants ``...-keep`` (the first router of ``tiny`` and ``vits``, and 4 experts in ``scaling``) set
``recompute_intermediates=False``: the forward pass's intermediates are kept for the backward pass instead of
recomputed there (faster, more memory).

Timing: a training step (forward + backward + AdamW step, train mode) and inference (eval forward under
``torch.inference_mode()``). All variants of a setting live in one process and are timed round-robin (the order
rotates every repeat); the median over repeats is reported, with ratios to LoRA. ``os.getloadavg()`` is printed at
start and end: on a loaded machine the absolute times are indicative only, the interleaved ratios less so.
Work: the floating-point operations of one training step and of one inference call, counted by
``torch.utils.flop_counter.FlopCounterMode`` on the eager model (matmul-family ops, attention and convolutions; not
elementwise ops, ``topk`` or the optimizer). Their ratio to LoRA's is the floor of the time ratio for kernels that
run equally fast: no implementation of the same computation gets below it.
Peak memory: every variant runs one warm-up and one training step in its own subprocess. The figure is the peak of the
bytes held by tensors, counted from before the first step: on CUDA ``torch.cuda.max_memory_allocated`` minus the
allocation before, on CPU the running sum of the allocations and frees ``torch.profiler`` records
(``profile_memory=True``). On CPU the table also gives the peak resident set size (``VmHWM``, reset just before the
first step, minus the resident size then; measured on a first copy of the model, without the profiler): it also
counts what the first step loads once (library code pages, kernel caches) and what the allocator keeps, about 220 MB
of LoRA's 390 MB on the ViT-S/16 shape, so its ratios understate the tensors' difference.

    PYTHONPATH=. python benchmarks/bench_gnnmoe.py             # everything (several minutes on 2 cores)
    python benchmarks/bench_gnnmoe.py --quick                  # smoke run: 1 block, tiny batches, 2 repeats
    python benchmarks/bench_gnnmoe.py --device cuda --dtype bf16
    PYTHONPATH=. python benchmarks/bench_gnnmoe.py --settings tiny --compile   # torch.compile(model), every variant

``PYTHONPATH=.`` makes the script import this checkout's ``peft_gnnmoe``. Writes
benchmarks/results/gnnmoe_bench.json (or ``--output``) and prints a Markdown table per setting.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
TINY_BACKBONE = ROOT / "assets" / "vit-tiny-fashion-contours"
QKV = ["q_proj", "k_proj", "v_proj"]
ALL_LINEAR = QKV + ["o_proj", "fc1", "fc2"]
# GNN-MoE at a trainable-parameter budget no larger than LoRA r=8 on the same q/k/v layers
GNNMOE_BUDGET = dict(num_experts=4, top_k=2, kron_factor=4, kron_rank=1, router_hidden=16, expert_bias=False)
SETTINGS = {
    "tiny": dict(width=None, layers=None, image=28, batch=24, targets=QKV, lora_r=4, lokr=False, budget=False),
    "vits": dict(width=384, layers=4, image=224, batch=8, targets=ALL_LINEAR, lora_r=8, lokr=False, budget=False),
    "vitb": dict(width=768, layers=4, image=224, batch=8, targets=QKV, lora_r=8, lokr=True, budget=True),
    "scaling": dict(width=384, layers=4, image=224, batch=8, targets=QKV, lora_r=8, lokr=False, budget=False),
}
SCALING_EXPERTS = (4, 8, 16, 32)  # the ``scaling`` setting's expert counts (top-2 each)
QUICK = dict(layers=1, batch=2)  # --quick: the ViT shapes get one block; every batch is 2


def routers() -> tuple[str, ...]:
    from peft_gnnmoe.tuners.gnnmoe.config import ROUTER_TYPES

    return tuple(ROUTER_TYPES)


def setting(name: str, quick: bool) -> dict:
    s = dict(SETTINGS[name])
    if quick:
        s["batch"] = QUICK["batch"]
        s["layers"] = s["layers"] and QUICK["layers"]
    return s


def variants(name: str, chosen_routers: list[str]) -> list[str]:
    if name == "scaling":
        modes = {e: ("", "-dense") for e in SCALING_EXPERTS} | {SCALING_EXPERTS[0]: ("", "-keep", "-dense")}
        return ["lora"] + [f"gnnmoe-gcn-e{e}{mode}" for e in SCALING_EXPERTS for mode in modes[e]]
    keep = [f"gnnmoe-{chosen_routers[0]}-keep"] if not SETTINGS[name]["budget"] else []
    return ["lora"] + (["lokr"] if SETTINGS[name]["lokr"] else []) + [f"gnnmoe-{r}" for r in chosen_routers] + keep


def build_model(s: dict) -> torch.nn.Module:
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    if s["width"] is None:
        return ViTForImageClassification.from_pretrained(TINY_BACKBONE, num_labels=10)
    config = ViTConfig(
        hidden_size=s["width"],
        num_hidden_layers=s["layers"],
        num_attention_heads=s["width"] // 64,
        intermediate_size=4 * s["width"],
        image_size=s["image"],
        patch_size=16,
        num_labels=10,
    )
    return ViTForImageClassification(config)


def peft_config(variant: str, s: dict):
    from peft import LoKrConfig, LoraConfig

    from peft_gnnmoe import GNNMoEConfig

    common = dict(target_modules=s["targets"], modules_to_save=["classifier"])
    if variant == "lora":
        return LoraConfig(r=s["lora_r"], lora_alpha=2 * s["lora_r"], **common)
    if variant == "lokr":
        return LoKrConfig(r=8, alpha=16, **common)
    router, *options = variant.removeprefix("gnnmoe-").split("-")  # e.g. gcn, gcn-e16, gcn-e16-dense, gcn-keep
    for option in options:
        if option == "dense":
            common["expert_dispatch"] = "dense"
        elif option == "keep":
            common["recompute_intermediates"] = False
        else:
            common["num_experts"] = int(option.removeprefix("e"))
    if not s["budget"]:
        return GNNMoEConfig(router=router, **common)
    budget = dict(GNNMOE_BUDGET, router_hidden=8) if router == "sage" else GNNMOE_BUDGET
    return GNNMoEConfig(router=router, **common, **budget)


class Variant:
    """One adapted model with its optimizer and a fixed batch; ``train_step()`` and ``infer()`` are what we time."""

    def __init__(self, name: str, s: dict, device: str, dtype: torch.dtype, compile: bool = False) -> None:
        from peft import get_peft_model

        import peft_gnnmoe  # noqa: F401  (registers the tuner)

        self.name = name
        self.model = get_peft_model(build_model(s), peft_config(name, s)).to(device=device, dtype=dtype)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.trainable = sum(p.numel() for n, p in self.model.named_parameters() if p.requires_grad)
        self.trainable_adapter = sum(
            p.numel() for n, p in self.model.named_parameters() if p.requires_grad and "classifier" not in n
        )
        self.optimizer = torch.optim.AdamW(params, lr=1e-4)
        generator = torch.Generator().manual_seed(0)
        self.pixels = torch.randn(s["batch"], 3, s["image"], s["image"], generator=generator).to(device, dtype)
        self.labels = torch.randint(0, 10, (s["batch"],), generator=generator).to(device)
        self.device = device
        # --compile: the warm-up call compiles (train and eval mode each once); the timed calls reuse the graphs
        self.forward = torch.compile(self.model) if compile else self.model

    def train_step(self) -> None:
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        self.forward(pixel_values=self.pixels, labels=self.labels).loss.backward()
        self.optimizer.step()

    def infer(self) -> None:
        self.model.eval()
        with torch.inference_mode():
            self.forward(pixel_values=self.pixels)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_peak_rss() -> None:
    """Reset the process's high-water mark (Linux >= 4.0), so that building the model does not count as the peak."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def _cpu_tensor_peak_bytes(v: Variant) -> int:
    """The peak of the bytes held by tensors over ``v``'s warm-up and one training step, counted from before the first
    (the allocations and frees the profiler records, in time order): CPU's ``torch.cuda.max_memory_allocated``."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        v.train_step()
        v.train_step()
    events = sorted(
        (e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"
    )
    held = peak = 0
    for _, nbytes in events:
        held += nbytes
        peak = max(peak, held)
    return peak


def peak_memory_worker(name: str, s: dict, device: str, dtype: torch.dtype, compile: bool = False) -> dict:
    """In a fresh process: the memory one training step adds (warm-up + one step), in MB: the peak of the tensors it
    allocates (``peak_extra_mb``) and, on CPU, of the resident set (``peak_rss_extra_mb``, from a first copy of the
    model, before the profiler runs)."""
    v = Variant(name, s, device, dtype, compile)
    if device.startswith("cuda"):
        _sync(device)
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        v.train_step()
        v.train_step()
        _sync(device)
        peak = torch.cuda.max_memory_allocated() - before
        return {"variant": name, "peak_extra_mb": max(peak, 0) / 2**20, "peak_rss_extra_mb": None}
    _reset_peak_rss()
    before = _rss_bytes()
    v.train_step()
    v.train_step()
    rss = max(_peak_rss_bytes() - before, 0) / 2**20
    del v
    peak = _cpu_tensor_peak_bytes(Variant(name, s, device, dtype, compile))
    return {"variant": name, "peak_extra_mb": peak / 2**20, "peak_rss_extra_mb": rss}


def count_flops(v: Variant) -> dict[str, int]:
    """FLOPs of one training step and one inference call of ``v``'s eager model (``FlopCounterMode``)."""
    from torch.utils.flop_counter import FlopCounterMode

    forward = v.forward
    v.forward = v.model  # count the eager graph, also under --compile
    try:
        counts = {}
        for what in ("train_step", "infer"):
            with FlopCounterMode(display=False) as counter:
                getattr(v, what)()
            counts[what] = counter.get_total_flops()
    finally:
        v.forward = forward
    return counts


def time_round_robin(models: list[Variant], what: str, repeats: int, device: str) -> dict[str, float]:
    """Median seconds of ``what`` per variant, variants interleaved, the order rotated every repeat."""
    times: dict[str, list[float]] = {m.name: [] for m in models}
    for m in models:  # warm-up; compiled models recompile once after the first call (e.g. config.problem_type set)
        for _ in range(3 if m.forward is not m.model else 1):
            getattr(m, what)()
    for rep in range(repeats):
        for m in models[rep % len(models) :] + models[: rep % len(models)]:
            _sync(device)
            start = time.perf_counter()
            getattr(m, what)()
            _sync(device)
            times[m.name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def run_setting(name: str, args: argparse.Namespace, dtype: torch.dtype) -> list[dict]:
    s = setting(name, args.quick)
    names = variants(name, args.routers)
    memory = {}
    if args.memory:
        for v in names:
            cmd = [sys.executable, __file__, "--worker", name, v, "--device", args.device, "--dtype", args.dtype]
            cmd += ["--threads", str(args.threads)] + (["--quick"] if args.quick else [])
            cmd += ["--compile"] if args.compile else []
            out = subprocess.run(cmd, capture_output=True, text=True, check=True)
            memory[v] = json.loads(out.stdout.strip().splitlines()[-1])
    models = [Variant(v, s, args.device, dtype, args.compile) for v in names]
    train = time_round_robin(models, "train_step", args.repeats, args.device)
    infer = time_round_robin(models, "infer", args.repeats, args.device)
    rows = []
    for m in models:
        flops = count_flops(m)
        row = {
            "setting": name,
            "variant": m.name,
            "trainable_params": m.trainable_adapter,
            "train_step_s": train[m.name],
            "inference_s": infer[m.name],
            "peak_extra_mb": memory.get(m.name, {}).get("peak_extra_mb"),
            "peak_rss_extra_mb": memory.get(m.name, {}).get("peak_rss_extra_mb"),
            "train_gflop": flops["train_step"] / 1e9,
            "inference_gflop": flops["infer"] / 1e9,
        }
        rows.append(row)
    lora = rows[0]
    for row in rows:
        row["train_vs_lora"] = row["train_step_s"] / lora["train_step_s"]
        row["inference_vs_lora"] = row["inference_s"] / lora["inference_s"]
        row["params_vs_lora"] = row["trainable_params"] / lora["trainable_params"]
        row["train_flops_vs_lora"] = row["train_gflop"] / lora["train_gflop"]
        row["inference_flops_vs_lora"] = row["inference_gflop"] / lora["inference_gflop"]
        if args.memory:
            row["memory_vs_lora"] = row["peak_extra_mb"] / lora["peak_extra_mb"]
            if lora["peak_rss_extra_mb"]:
                row["rss_vs_lora"] = row["peak_rss_extra_mb"] / lora["peak_rss_extra_mb"]
    return rows


def print_table(name: str, s: dict, rows: list[dict]) -> None:
    shape = "embedded backbone (64 wide, 4 blocks, 7x7 patches)" if s["width"] is None else f"{s['width']} wide"
    blocks = "" if s["width"] is None else f", {s['layers']} blocks"
    print(f"\n**{name}**: {shape}{blocks}, {s['image']} px, batch {s['batch']}, targets {'/'.join(s['targets'])}")
    print(
        "\n| variant | adapter params | train step ms | × LoRA | train GFLOP | × LoRA | inference ms | × LoRA "
        "| inference GFLOP | × LoRA | peak extra MB | × LoRA | peak RSS MB | × LoRA |"
    )
    print("|---|" + "---:|" * 13)
    for r in rows:
        mem = "n/a | n/a" if r["peak_extra_mb"] is None else f"{r['peak_extra_mb']:.0f} | {r['memory_vs_lora']:.2f}"
        if r["peak_rss_extra_mb"] is None:
            mem += " | n/a | n/a"
        else:
            mem += f" | {r['peak_rss_extra_mb']:.0f} | {r['rss_vs_lora']:.2f}"
        print(
            f"| {r['variant']} | {r['trainable_params']:,} | {r['train_step_s'] * 1e3:.1f} | {r['train_vs_lora']:.2f} "
            f"| {r['train_gflop']:.2f} | {r['train_flops_vs_lora']:.2f} | {r['inference_s'] * 1e3:.1f} "
            f"| {r['inference_vs_lora']:.2f} | {r['inference_gflop']:.2f} | {r['inference_flops_vs_lora']:.2f} "
            f"| {mem} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS))
    parser.add_argument("--routers", nargs="+", default=None, help="GNN-MoE routers (default: every router type)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per variant (default 7; quick 2)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (the machine may be shared)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 block, batch 2, 2 repeats")
    parser.add_argument("--memory", action=argparse.BooleanOptionalAction, default=True, help="peak memory pass")
    parser.add_argument("--compile", action="store_true", help="time torch.compile(model) (inductor)")
    parser.add_argument("--output", type=Path, default=RESULTS / "gnnmoe_bench.json")
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    if args.worker:
        name, variant = args.worker
        print(json.dumps(peak_memory_worker(variant, setting(name, args.quick), args.device, dtype, args.compile)))
        return
    args.routers = args.routers or list(routers())
    args.repeats = args.repeats or (2 if args.quick else 7)

    load_start = os.getloadavg()
    print(
        f"load average at start: {load_start}; torch {torch.__version__}, {args.device}, {args.dtype}, "
        f"{args.threads} thread(s){', torch.compile' if args.compile else ''}",
        flush=True,
    )
    rows = []
    for name in args.settings:
        print(f"running {name} ...", file=sys.stderr, flush=True)
        setting_rows = run_setting(name, args, dtype)
        print_table(name, setting(name, args.quick), setting_rows)
        rows += setting_rows
    load_end = os.getloadavg()
    print(f"\nload average at end: {load_end}")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    config = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "worker"}
    result = {
        "config": config | {"gnnmoe_budget": GNNMOE_BUDGET, "torch": torch.__version__},
        "memory_method": "own subprocess per variant, warm-up + one training step; peak_extra_mb: tensors "
        "(CUDA: max_memory_allocated minus memory_allocated before; CPU: running sum of the profiler's memory "
        "events); peak_rss_extra_mb (CPU): VmHWM (reset before the first step) minus RSS then",
        "loadavg_start": load_start,
        "loadavg_end": load_end,
        "rows": rows,
    }
    args.output.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

"""What ``recompute_intermediates`` costs, split between the routers and the experts: one training step of the default
GNN-MoE config (GCN) with the routers' and the experts' recomputing switched on and off separately, interleaved
with LoRA in one process (``bench_gnnmoe``'s settings, variants and round-robin timing).

    PYTHONPATH=. python benchmarks/recompute_ablation.py                   # ViT-S/16 shape, all six projections
    PYTHONPATH=. python benchmarks/recompute_ablation.py --setting tiny    # the embedded backbone

Writes benchmarks/results/recompute_ablation.json (or ``--output``) and prints the step times and their ratio to
LoRA's.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_gnnmoe  # noqa: E402

COMBINATIONS = {  # name: (routers recompute, experts recompute)
    "recompute both (default)": (True, True),
    "routers only": (True, False),
    "experts only": (False, True),
    "keep both": (False, False),
}


def build(setting: dict, routers: bool, experts: bool, name: str) -> bench_gnnmoe.Variant:
    """The default GCN config with the routers' and the experts' recomputing set separately."""
    from peft_gnnmoe.tuners.gnnmoe.layer import GNNMoELayer
    from peft_gnnmoe.tuners.gnnmoe.router import GraphRouter

    variant = bench_gnnmoe.Variant("gnnmoe-gcn", setting, "cpu", torch.float32)
    for module in variant.model.modules():
        if isinstance(module, GraphRouter):
            module.recompute = routers
        if isinstance(module, GNNMoELayer):
            module.gnnmoe_recompute = {adapter: experts for adapter in module.gnnmoe_recompute}
    variant.name = name
    return variant


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setting", choices=["tiny", "vits", "scaling"], default="vits")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="smoke run: one block, batch 2")
    parser.add_argument("--output", type=Path, default=bench_gnnmoe.RESULTS / "recompute_ablation.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    setting = bench_gnnmoe.setting(args.setting, args.quick)
    load_start = os.getloadavg()
    models = [bench_gnnmoe.Variant("lora", setting, "cpu", torch.float32)]
    models += [build(setting, *flags, name) for name, flags in COMBINATIONS.items()]
    times = bench_gnnmoe.time_round_robin(models, "train_step", args.repeats, "cpu")
    rows = [{"variant": name, "train_step_s": t, "train_vs_lora": t / times["lora"]} for name, t in times.items()]
    for row in rows:
        print(f"{row['variant']:>26}: {row['train_step_s'] * 1e3:8.1f} ms  {row['train_vs_lora']:.3f} x LoRA")
    load_end = os.getloadavg()
    print(f"load average: {load_start} at the start, {load_end} at the end")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    result = {"config": {k: str(v) for k, v in vars(args).items()}, "torch": torch.__version__, "rows": rows}
    args.output.write_text(json.dumps(result | {"loadavg_start": load_start, "loadavg_end": load_end}, indent=2))


if __name__ == "__main__":
    main()

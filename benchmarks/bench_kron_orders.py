"""Where GNN-MoE's sparse expert order beats the dense ones: the experts alone, per layer shape, experts and top-k.

For each case, the sparse order (``sparse.kron_moe_forward_sparse``) and the dense orders a layer of that shape can
take (``kronecker.kron_path``) run forward + backward on random tokens, random routing logits and random experts,
interleaved round-robin; the median of the timed repeats (after 3 warm-ups) is reported, with the sparse order's
time as a ratio to the order the layer takes without ``top_k``. ``kronecker.SPARSE_EXPERTS_PER_CHOICE`` comes from
this table (docs/results/benchmarks.md).

    PYTHONPATH=. python benchmarks/bench_kron_orders.py            # one thread, about a minute
    PYTHONPATH=. python benchmarks/bench_kron_orders.py --quick    # two cases, a smoke run

Writes benchmarks/results/kron_orders.json (or ``--output``) and prints one line per case.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from peft_gnnmoe.tuners.gnnmoe import kronecker
from peft_gnnmoe.tuners.gnnmoe.sparse import kron_moe_forward_sparse

RESULTS = Path(__file__).resolve().parent / "results"
# tokens, in_features, out_features: ViT-S/16 q/k/v and fc1 at batch 8, the embedded backbone at batch 24, ViT-B/16
SHAPES = [(1576, 384, 384), (1576, 384, 1536), (1200, 64, 64), (1576, 768, 768)]
EXPERTS_TOP_K = [(2, 1), (4, 1), (8, 1), (4, 2), (8, 2), (16, 2), (32, 2), (8, 4)]
DENSE_ORDERS = {
    "dense": kronecker.kron_moe_forward_dense,
    "folded": kronecker.kron_moe_forward_folded,
    "blocked": kronecker.kron_moe_forward_blocked,
}


def time_case(tokens: int, d_in: int, d_out: int, experts: int, top_k: int, repeats: int) -> dict:
    torch.manual_seed(0)
    factor, rank = 4, 4
    t = kronecker.init_kron_experts(d_in, d_out, experts, factor, rank, zero_right=False)
    params = {name: tensor.requires_grad_() for name, tensor in t.items()}
    x = torch.randn(tokens, d_in, requires_grad=True)
    logits = torch.randn(tokens, experts, requires_grad=True)
    taken = kronecker.kron_path(d_in, d_out, experts, factor, rank)
    orders = ["sparse", taken]

    def step(order: str) -> None:
        weights, index = logits.softmax(-1).topk(top_k, dim=-1)
        gates = torch.zeros(tokens, experts).scatter(-1, index, weights)
        experts_ = (params["rules"], params["left"], params["right"], params["bias"])
        if order == "sparse":
            y = kron_moe_forward_sparse(x, gates, index, *experts_)
        else:
            y = DENSE_ORDERS[order](x, gates, *experts_)
        y.sum().backward()

    times: dict[str, list[float]] = {order: [] for order in orders}
    for rep in range(repeats + 3):
        for order in orders[rep % 2 :] + orders[: rep % 2]:
            start = time.perf_counter()
            step(order)
            if rep >= 3:
                times[order].append(time.perf_counter() - start)
    median = {order: statistics.median(values) for order, values in times.items()}
    return {
        "tokens": tokens, "in_features": d_in, "out_features": d_out, "num_experts": experts, "top_k": top_k,
        "dense_order": taken, "dense_ms": median[taken] * 1e3, "sparse_ms": median["sparse"] * 1e3,
        "sparse_vs_dense": median["sparse"] / median[taken],
        "auto_takes": kronecker.kron_path(d_in, d_out, experts, factor, rank, top_k),
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=12)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="two small cases, 2 repeats")
    parser.add_argument("--output", type=Path, default=RESULTS / "kron_orders.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cases = [(s, e) for s in SHAPES for e in EXPERTS_TOP_K]
    if args.quick:
        cases, args.repeats = [((64, 64, 64), (8, 1)), ((64, 64, 64), (8, 2))], 2
    load_start = os.getloadavg()
    print(f"load average at start: {load_start}; torch {torch.__version__}, {args.threads} thread(s)", flush=True)
    rows = []
    for (tokens, d_in, d_out), (experts, top_k) in cases:
        row = time_case(tokens, d_in, d_out, experts, top_k, args.repeats)
        rows.append(row)
        print(
            f"{tokens} tokens, {d_in}->{d_out}, E={experts}, top-{top_k}: "
            f"{row['dense_order']} {row['dense_ms']:.2f} ms, sparse {row['sparse_ms']:.2f} ms, "
            f"ratio {row['sparse_vs_dense']:.2f}; auto takes {row['auto_takes']}",
            flush=True,
        )
    load_end = os.getloadavg()
    print(f"load average at end: {load_end}")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    result = {"config": vars(args) | {"output": str(args.output)}, "torch": torch.__version__}
    args.output.write_text(json.dumps(result | {"loadavg_start": load_start, "loadavg_end": load_end, "rows": rows}))


if __name__ == "__main__":
    main()

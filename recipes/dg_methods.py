"""The fine-tuning methods compared by the DG recipe, each built from the same backbone checkpoint.

``gnnmoe-<router>`` (GNN-MoE, this project), ``lora`` and ``lokr`` (PEFT) adapt the same q/k/v projections of every
encoder block and train the classification head; ``probe`` trains the head only; ``full`` trains everything.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoModelForImageClassification

METHODS = ("gnnmoe", "lora", "lokr", "probe", "full")
ROUTERS = ("gcn", "gat", "sage")
# default learning rates (AdamW, constant); see the README (domain generalization section) for how they were chosen
DEFAULT_LR = {"gnnmoe": 3e-3, "lora": 3e-3, "lokr": 3e-3, "probe": 1e-2, "full": 1e-3}
_QKV_NAMES = (("q_proj", "k_proj", "v_proj"), ("query", "key", "value"))


@dataclass
class MethodArgs:
    """Method hyper-parameters shared by every run of a sweep."""

    lora_r: int = 4
    lokr_r: int = 4
    num_experts: int = 4
    top_k: int = 2
    kron_rank: int = 4
    kron_factor: int = 4


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
    return name.split("-")[0]


def qkv_names(model: nn.Module) -> list[str]:
    """The q/k/v projection names this model uses (transformers 5: ``q_proj``…; 4.x: ``query``…)."""
    leaves = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    for names in _QKV_NAMES:
        if set(names) <= leaves:
            return list(names)
    raise ValueError(f"{type(model).__name__} has no q/k/v projections named {_QKV_NAMES}; is it a ViT-family model?")


def head_name(model: nn.Module, num_labels: int) -> str:
    """Name of the top-level classification head (a Linear with ``num_labels`` outputs)."""
    for name, module in model.named_children():
        if isinstance(module, nn.Linear) and module.out_features == num_labels:
            return name
    raise ValueError(f"No top-level Linear head with {num_labels} outputs in {type(model).__name__}.")


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

    from peft import LoKrConfig, LoraConfig, get_peft_model

    targets = qkv_names(model)
    if method == "lora":
        config = LoraConfig(r=hp.lora_r, lora_alpha=2 * hp.lora_r, target_modules=targets, modules_to_save=[head])
    elif method == "lokr":
        config = LoKrConfig(r=hp.lokr_r, alpha=2 * hp.lokr_r, target_modules=targets, modules_to_save=[head])
    elif method == "gnnmoe":
        from peft_gnnmoe import GNNMoEConfig

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


def gnnmoe_available() -> bool:
    try:
        from peft_gnnmoe import GNNMoEConfig  # noqa: F401
    except ImportError:
        return False
    return True


def routing_assignments(model: nn.Module) -> dict[str, dict] | None:
    """The GNN-MoE routers' per-token expert choices from the last forward pass (None for other methods)."""
    try:
        from peft_gnnmoe import get_expert_assignments
    except ImportError:
        return None
    try:
        return get_expert_assignments(model)
    except TypeError:  # not a GNN-MoE model
        return None


@torch.no_grad()
def routing_entropy(model: nn.Module) -> float | None:
    """Mean routing entropy over the routers of the last forward pass (None for other methods)."""
    try:
        from peft_gnnmoe import get_routing_stats

        stats = get_routing_stats(model)
    except (ImportError, TypeError):
        return None
    if not stats:
        return None
    return sum(s["entropy"] for s in stats.values()) / len(stats)

"""DeepSpeed ZeRO-3 partitions every weight before PEFT sees the model (``zero.Init``, or ``from_pretrained`` under
``HfDeepSpeedConfig``): each rank's parameter has shape ``[0]`` and the full shape is in its ``ds_shape`` attribute.
The adapters must take their shapes from the Linear's ``in_features`` / ``out_features`` (or ``ds_shape``, as PEFT's
LoRA reads it), never from ``weight.shape``. Here the weights are partitioned as DeepSpeed leaves them, without
DeepSpeed, and the adapters must come out as on the intact model.
"""

from __future__ import annotations

import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from peft_gnnmoe import GNNMoEConfig, SinkDecorrelationConfig


def _partition(model: nn.Module) -> nn.Module:
    """Every Linear's weight as a ZeRO-3 rank holds it: an empty parameter carrying the full shape in ``ds_shape``."""
    for module in model.modules():
        if isinstance(module, nn.Linear):
            full = module.weight
            module.weight = nn.Parameter(torch.empty(0, dtype=full.dtype), requires_grad=full.requires_grad)
            module.weight.ds_shape, module.weight.ds_numel = full.shape, full.numel()
    return model


def _shapes(model: nn.Module, prefix: str) -> dict[str, torch.Size]:
    return {name: param.shape for name, param in model.named_parameters() if prefix in name}


def test_partitioned_model_has_empty_weights(make_vit):
    """The stand-in is what the tests below need: no Linear weight has its full shape any more."""
    model = _partition(make_vit())
    assert {m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear)} == {0}


def test_gnnmoe_experts_and_routers_of_a_partitioned_model(make_vit):
    # q/k/v are square; fc1 (32 -> 64) and fc2 (64 -> 32) are not, so in and out cannot be swapped unseen
    config = lambda: GNNMoEConfig(target_modules=["q_proj", "k_proj", "v_proj", "fc1", "fc2"])  # noqa: E731
    intact = get_peft_model(make_vit(), config())
    partitioned = get_peft_model(_partition(make_vit()), config())
    assert _shapes(partitioned, "gnnmoe_") == _shapes(intact, "gnnmoe_")


def test_sink_decorrelation_lora_of_a_partitioned_model(make_lm):
    # v_proj (32 -> 16: 2 key-value heads) and down_proj (64 -> 32) are not square
    config = lambda: SinkDecorrelationConfig(  # noqa: E731
        base_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"])
    )
    intact = get_peft_model(make_lm(), config())
    partitioned = get_peft_model(_partition(make_lm()), config())
    assert _shapes(partitioned, "lora_") == _shapes(intact, "lora_")

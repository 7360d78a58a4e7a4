"""Make third-party tuner types known to PEFT (see ``peft_gnnmoe.utils.peft_internals`` for how)."""

from __future__ import annotations

from peft import PeftModel
from peft.utils import PeftType

from .utils.hub import install_push_to_hub
from .utils.peft_internals import add_peft_type_member, register_method


def register_peft_type(name: str, config_cls: type, model_cls: type) -> PeftType:
    """Register a tuner under ``name`` (lower case) with the prefix ``name + "_"``; idempotent.

    Args:
        name: the method's name in lower case, e.g. ``"gnnmoe"``; ``adapter_config.json`` stores ``name.upper()``.
        config_cls: the ``PeftConfig`` subclass.
        model_cls: the ``BaseTuner`` subclass; its ``prefix`` must be ``name + "_"``.

    ``PeftModel.push_to_hub`` then keeps the model card ``save_pretrained`` writes for adapters of this type (with
    its loading snippet) instead of replacing it by transformers' template (``peft_gnnmoe.utils.hub``).
    """
    peft_type = register_method(name, config_cls, model_cls)
    install_push_to_hub(PeftModel, peft_type.value)
    return peft_type


def peft_type_member(value: str) -> PeftType:
    """``PeftType[value]``, created as a real enum member if needed; tuner configs call it at import time to get their
    ``peft_type`` (e.g. ``GNNMOE_PEFT_TYPE = peft_type_member("GNNMOE")``)."""
    return add_peft_type_member(value)

"""Make third-party tuner types known to PEFT.

PEFT's ``register_peft_method`` only accepts names that already are members of the closed ``PeftType`` enum. This
module adds a real enum member first (so ``PeftType("GNNMOE")``, ``PeftType.GNNMOE`` and ``list(PeftType)`` all see
it) and then registers the config and tuner classes. Calling it again for the same name is harmless: the mappings are
pointed at the (possibly reloaded) classes instead of raising.
"""

from __future__ import annotations

from peft.mapping import (
    PEFT_TYPE_TO_CONFIG_MAPPING,
    PEFT_TYPE_TO_MIXED_MODEL_MAPPING,
    PEFT_TYPE_TO_PREFIX_MAPPING,
    PEFT_TYPE_TO_TUNER_MAPPING,
)
from peft.utils import PeftType, register_peft_method


def _ensure_peft_type_member(value: str) -> PeftType:
    """Return ``PeftType[value]``, adding it as a genuine enum member when it does not exist yet."""
    if value in PeftType.__members__:
        return PeftType[value]
    member = str.__new__(PeftType, value)
    member._name_ = value
    member._value_ = value
    member.__objclass__ = PeftType
    # bypass EnumType.__setattr__, which refuses to touch members; do it before the member maps know the name
    type.__setattr__(PeftType, value, member)
    PeftType._member_map_[value] = member
    PeftType._value2member_map_[value] = member
    PeftType._member_names_.append(value)
    return member


def register_peft_type(name: str, config_cls: type, model_cls: type) -> PeftType:
    """Register a tuner under ``name`` (lower case) with the prefix ``name + "_"``; idempotent.

    Args:
        name: the method's name in lower case, e.g. ``"gnnmoe"``; ``adapter_config.json`` stores ``name.upper()``.
        config_cls: the ``PeftConfig`` subclass.
        model_cls: the ``BaseTuner`` subclass; its ``prefix`` must be ``name + "_"``.
    """
    peft_type = _ensure_peft_type_member(name.upper())
    prefix = name + "_"
    if peft_type in PEFT_TYPE_TO_TUNER_MAPPING:
        # second import (e.g. importlib.reload): refresh the classes instead of failing on the duplicate
        PEFT_TYPE_TO_CONFIG_MAPPING[peft_type] = config_cls
        PEFT_TYPE_TO_TUNER_MAPPING[peft_type] = model_cls
        PEFT_TYPE_TO_PREFIX_MAPPING[peft_type] = prefix
        PEFT_TYPE_TO_MIXED_MODEL_MAPPING.pop(peft_type, None)
        return peft_type
    register_peft_method(name=name, config_cls=config_cls, model_cls=model_cls, prefix=prefix)
    return peft_type

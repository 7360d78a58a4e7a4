"""The one place that touches PEFT's private internals.

peft-gnnmoe relies on a few PEFT names that are not public API: the structural state-dict helpers of peft 0.21
(``_get_tuner_state_dict_key_prefixes``, ``_filter_state_dict_by_key_prefixes``), the layout of the ``PeftType``
str-enum (a third-party method needs a real member before ``register_peft_method`` accepts it), the mapping tables of
``peft.mapping`` and the way a tuner attaches ``peft_config`` to the model it wraps. Every use goes through this
module, and ``check_peft_internals()`` (run by the test suite) fails with a message naming this file as soon as a
PEFT release changes one of them. To try a newer PEFT: ``pip install -U peft && python -m pytest tests/utils``.
"""

from __future__ import annotations

import enum
import inspect
from typing import Any

import peft
import torch
from peft.mapping import (
    PEFT_TYPE_TO_CONFIG_MAPPING,
    PEFT_TYPE_TO_MIXED_MODEL_MAPPING,
    PEFT_TYPE_TO_PREFIX_MAPPING,
    PEFT_TYPE_TO_TUNER_MAPPING,
)
from peft.tuners import tuners_utils
from peft.utils import PeftType, register_peft_method
from torch import nn

TESTED_PEFT_VERSIONS = ">=0.21,<0.22"  # keep in sync with setup.py

_REQUIRED_TUNERS_UTILS = ("_get_tuner_state_dict_key_prefixes", "_filter_state_dict_by_key_prefixes")
_REQUIRED_ENUM_ATTRIBUTES = ("_member_map_", "_value2member_map_", "_member_names_")


class PeftInternalsChanged(RuntimeError):
    """A private PEFT name that peft-gnnmoe relies on is gone or has changed."""


def _changed(what: str) -> PeftInternalsChanged:
    return PeftInternalsChanged(
        f"peft {peft.__version__} changed {what}, which peft-gnnmoe relies on (see "
        f"peft_gnnmoe/utils/peft_internals.py; tested with peft{TESTED_PEFT_VERSIONS}). Install a tested version, "
        f"e.g. `pip install 'peft{TESTED_PEFT_VERSIONS}'`, or update peft_internals.py for the new release."
    )


def check_peft_internals() -> None:
    """Raise ``PeftInternalsChanged`` when one of the private PEFT names used here is missing or has changed shape."""
    for name in _REQUIRED_TUNERS_UTILS:
        func = getattr(tuners_utils, name, None)
        if not callable(func):
            raise _changed(f"peft.tuners.tuners_utils.{name} (missing)")
    params = list(inspect.signature(tuners_utils._get_tuner_state_dict_key_prefixes).parameters)
    if params[:2] != ["model", "adapter_name"]:
        raise _changed(f"the signature of _get_tuner_state_dict_key_prefixes ({params})")
    params = list(inspect.signature(tuners_utils._filter_state_dict_by_key_prefixes).parameters)
    if params[:2] != ["state_dict", "prefixes"]:
        raise _changed(f"the signature of _filter_state_dict_by_key_prefixes ({params})")
    if not (isinstance(PeftType, enum.EnumMeta) and issubclass(PeftType, str)):
        raise _changed("PeftType (no longer a str Enum)")
    for name in _REQUIRED_ENUM_ATTRIBUTES:
        if name not in vars(PeftType):  # the enum's own tables, not those inherited from Enum
            raise _changed(f"the PeftType enum internals ({name} missing)")
    for mapping in (PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING):
        if not isinstance(mapping, dict):
            raise _changed("the peft.mapping tables (no longer dicts)")
    for name in ("uses_shared_state", "inject_adapter", "_create_and_replace"):
        if not hasattr(tuners_utils.BaseTuner, name):
            raise _changed(f"BaseTuner.{name} (missing)")


# ---- state dicts ---------------------------------------------------------------------------------------------------


def tuner_state_dict_key_prefixes(model: nn.Module, adapter_name: str | None = None) -> set[str]:
    """State-dict key prefixes of everything that belongs to the PEFT method in ``model`` (peft 0.21's rule)."""
    return tuners_utils._get_tuner_state_dict_key_prefixes(model, adapter_name=adapter_name)


def filter_state_dict_by_key_prefixes(state_dict: dict[str, Any], prefixes: set[str]) -> dict[str, Any]:
    """The entries of ``state_dict`` under one of ``prefixes``."""
    return tuners_utils._filter_state_dict_by_key_prefixes(state_dict, prefixes)


# ---- the PeftType enum and registration ----------------------------------------------------------------------------


def add_peft_type_member(value: str) -> PeftType:
    """Return ``PeftType[value]``, adding it as a genuine enum member when it does not exist yet.

    ``register_peft_method`` only accepts names of the closed enum, so a third-party method needs a real member
    (``PeftType(value)``, ``PeftType[value]`` and ``list(PeftType)`` all see it), not a plain attribute.
    """
    if value in PeftType.__members__:
        return PeftType[value]
    member = str.__new__(PeftType, value)
    member._name_ = value
    member._value_ = value
    member.__objclass__ = PeftType
    # EnumType.__setattr__ refuses to touch members; set the attribute before the member maps know the name
    type.__setattr__(PeftType, value, member)
    PeftType._member_map_[value] = member
    PeftType._value2member_map_[value] = member
    PeftType._member_names_.append(value)
    return member


def register_method(name: str, config_cls: type, model_cls: type) -> PeftType:
    """Register a tuner under ``name`` (lower case) with the prefix ``name + "_"``; calling it again is harmless.

    A second import (e.g. ``importlib.reload``) points the mappings at the new classes instead of failing on the
    duplicate, as ``register_peft_method`` would.
    """
    peft_type = add_peft_type_member(name.upper())
    prefix = name + "_"
    if peft_type in PEFT_TYPE_TO_TUNER_MAPPING:
        PEFT_TYPE_TO_CONFIG_MAPPING[peft_type] = config_cls
        PEFT_TYPE_TO_TUNER_MAPPING[peft_type] = model_cls
        PEFT_TYPE_TO_PREFIX_MAPPING[peft_type] = prefix
        PEFT_TYPE_TO_MIXED_MODEL_MAPPING.pop(peft_type, None)
        return peft_type
    register_peft_method(name=name, config_cls=config_cls, model_cls=model_cls, prefix=prefix)
    return peft_type


# ---- one tuner inside another --------------------------------------------------------------------------------------


def inject_inner_adapter(
    base_config: Any,
    model: nn.Module,
    adapter_name: str,
    low_cpu_mem_usage: bool = False,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> list[str]:
    """Inject ``base_config``'s adapter layers into ``model`` with that method's own tuner; return the targeted names.

    A PEFT tuner stores its configs as ``model.peft_config``; the inner tuner must neither see nor extend the outer
    tuner's dict, so it is set aside while the inner tuner runs and restored afterwards.
    """
    tuner_cls = PEFT_TYPE_TO_TUNER_MAPPING.get(base_config.peft_type)
    if tuner_cls is None:
        raise ValueError(f"unknown inner PEFT type {base_config.peft_type!r}.")
    if tuner_cls.uses_shared_state:
        raise ValueError(f"{base_config.peft_type} keeps state on its tuner and cannot be used as base_config.")
    outer_peft_config = model.__dict__.pop("peft_config", None)
    try:
        inner = tuner_cls(model, base_config, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage, state_dict=state_dict)
    finally:
        model.__dict__.pop("peft_config", None)
        if outer_peft_config is not None:
            model.peft_config = outer_peft_config
    return list(inner.targeted_module_names)

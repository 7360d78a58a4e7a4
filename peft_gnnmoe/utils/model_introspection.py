"""Architecture facts of transformers models, looked up in one place: the (text) config, the stack of decoder layers,
the BOS token id.

Covers Llama, Qwen2, Gemma (``model.layers``), GPT-2 (``transformer.h``), multimodal wrappers
(``model.language_model.layers``) and encoders (``encoder.layer``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Union

from torch import nn

LayerSpec = Union[str, Sequence[int]]  # noqa: UP007 (a runtime alias)

# substrings that mark the language model inside a multimodal model; used to break ties between equally deep stacks
_TEXT_HINTS = ("language_model", "text_model", "decoder", "transformer", "model.layers")


def unwrap_model(model: nn.Module) -> nn.Module:
    """Return the transformers model inside a ``PeftModel`` / ``BaseTuner`` (or the model itself)."""
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model


def text_config(model: nn.Module) -> Any | None:
    """The text part of a model's config (``config.get_text_config()`` for multimodal models); None without config."""
    config = getattr(unwrap_model(model), "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    return config


def num_hidden_layers(model: nn.Module) -> int | None:
    """Depth of the (text) decoder from the model config, or None when the model has no transformers config."""
    config = text_config(model)
    return None if config is None else getattr(config, "num_hidden_layers", None)


def bos_token_id(model: nn.Module, override: int | None = None) -> int | None:
    """``override`` if given, else the (text) config's ``bos_token_id`` (None when the config has none)."""
    if override is not None:
        return override
    config = text_config(model)
    return None if config is None else getattr(config, "bos_token_id", None)


def find_decoder_layers(model: nn.Module, layers_module: str | None = None) -> tuple[str, nn.ModuleList]:
    """Return ``(path, layers)`` of the stack of transformer blocks whose outputs form the residual stream.

    Args:
        model: a transformers model (a ``PeftModel`` is unwrapped).
        layers_module: dotted path of the ``nn.ModuleList`` relative to the transformers model, e.g.
            ``"model.layers"``; found automatically when None.
    """
    model = unwrap_model(model)
    if layers_module is not None:
        try:
            layers = model.get_submodule(layers_module)
        except AttributeError as exc:
            raise ValueError(f"layers_module={layers_module!r} does not exist in {type(model).__name__}.") from exc
        if not isinstance(layers, nn.ModuleList):
            raise ValueError(f"layers_module={layers_module!r} is a {type(layers).__name__}, not an nn.ModuleList.")
        return layers_module, layers

    depth = num_hidden_layers(model)
    candidates = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) > 0 and len({type(m) for m in module}) == 1
    ]
    if depth is not None:
        candidates = [(n, m) for n, m in candidates if len(m) == depth]
    if not candidates:
        raise ValueError(
            f"Could not find the decoder layers of {type(model).__name__} (an nn.ModuleList of {depth} blocks); "
            "pass layers_module='path.to.layers'."
        )
    # prefer the language model's stack, then the deepest one
    candidates.sort(key=lambda item: (not any(h in item[0] for h in _TEXT_HINTS), -len(item[1])))
    return candidates[0]


def resolve_layer_indices(layers: LayerSpec, num_layers: int) -> list[int]:
    """Turn a layer selection into sorted, non-negative indices into the decoder stack.

    ``"all"`` selects every block; ``"all_but_last"`` every block except the last (the sink paper's reference code:
    transformers ``hidden_states[1:L]``); a list of ints selects those blocks (negative indices count from the end).
    Raises ``ValueError`` for indices outside ``[-num_layers, num_layers)``.
    """
    if isinstance(layers, str):
        if layers == "all":
            return list(range(num_layers))
        if layers == "all_but_last":
            if num_layers < 2:
                raise ValueError("layers='all_but_last' needs a model with at least 2 layers.")
            return list(range(num_layers - 1))
        raise ValueError(f"layers must be 'all', 'all_but_last' or a list of ints, got {layers!r}.")
    indices = []
    for index in layers:
        if isinstance(index, bool) or not isinstance(index, int):
            raise TypeError(f"layer indices must be ints, got {index!r}.")
        if not -num_layers <= index < num_layers:
            raise ValueError(
                f"layer index {index} does not exist: the model has {num_layers} decoder layers "
                f"(valid indices {-num_layers}..{num_layers - 1})."
            )
        indices.append(index % num_layers)
    if not indices:
        raise ValueError("layers is an empty list; select at least one decoder layer.")
    return sorted(set(indices))

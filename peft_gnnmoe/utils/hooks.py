"""Model-level forward hooks, installed the same way by both tuners."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn
from torch.utils.hooks import RemovableHandle

BeforeHook = Callable[[nn.Module, tuple, dict], "tuple[tuple, dict] | None"]
AfterHook = Callable[[nn.Module, tuple, dict, Any], Any]


def install_model_hooks(model: nn.Module, before: BeforeHook, after: AfterHook) -> list[RemovableHandle]:
    """Register ``before`` as a forward pre-hook and ``after`` as a forward hook on ``model``, both with kwargs.

    ``before(module, args, kwargs)`` may return new ``(args, kwargs)``; ``after(module, args, kwargs, output)`` may
    return a new output and also runs when the forward raised (``always_call``), so per-call state is always cleaned
    up. The hooks sit on the transformers model itself, so they apply however it is called (``PeftModel``, ``Trainer``,
    DDP, pipelines). Returns the handles; remove them on ``unload()``.
    """
    return [
        model.register_forward_pre_hook(before, with_kwargs=True),
        model.register_forward_hook(after, with_kwargs=True, always_call=True),
    ]

"""Per-call state of the decorrelation loss: what one forward needs between the model's pre-hook, the decoder layers'
hooks and the model's post-hook.

Every call gets its own ``SinkCall``, owned by the thread that runs it: ``nn.DataParallel`` runs its replicas in
threads that share the modules' hook dictionaries, so a layer hook acts only in the thread whose call registered it,
and the call removes its own hooks when it ends (also when the forward raised).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from ...utils.loss_terms import LossContext
from ...utils.packing import PackedLayout
from .config import SinkDecorrelationConfig
from .loss import layer_penalty_sums, packed_layer_penalty_sums

# transformers releases from this one on checkpoint a decoder layer's ``forward`` (not ``__call__``), so module hooks
# stay outside the checkpointed region
FIRST_TRANSFORMERS_WITH_HOOKS_OUTSIDE_CHECKPOINT = "5.23.0"


@dataclass
class SinkCall:
    """The state of one training forward."""

    config: SinkDecorrelationConfig
    indices: list[int]
    bos_positions: torch.Tensor  # (B,); packed rows: (B, T), the row position of each token's own BOS
    token_mask: torch.Tensor  # (B, T) bool
    context: LossContext  # packed rows: its labels are unpacked, one row per sequence
    packed: PackedLayout | None = None  # the sequences packed in the rows, None for one sequence per row
    thread: int = field(default_factory=threading.get_ident)
    layer_sums: dict[int, torch.Tensor] = field(default_factory=dict)  # layer index -> S_l, (B,)
    handles: list[RemovableHandle] = field(default_factory=list)

    @property
    def counts(self) -> torch.Tensor:
        """Selected tokens of every sequence, ``(B,)`` (packed rows: ``(S,)``, one per packed sequence)."""
        if self.packed is None:
            return self.token_mask.sum(dim=1)
        counts = torch.zeros(self.packed.num_sequences, dtype=torch.long, device=self.token_mask.device)
        return counts.index_add(0, self.packed.sequence.flatten(), self.token_mask.flatten().long())

    def attach(self, layers: nn.ModuleList) -> None:
        """Register one forward hook per chosen layer; each computes that layer's ``S_l`` from its output."""
        self.handles = [layers[i].register_forward_hook(self._layer_hook(i)) for i in self.indices]

    def detach(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def _layer_hook(self, index: int):
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            if threading.get_ident() != self.thread or index in self.layer_sums:
                return  # another thread's call (DataParallel replicas share hooks) or a recomputation
            hidden = output[0] if isinstance(output, (tuple, list)) else output  # B, T, D residual stream
            form = self.config.form
            if self.packed is None:
                self.layer_sums[index] = layer_penalty_sums(hidden, self.bos_positions, self.token_mask, form)
            else:
                packed = self.packed
                self.layer_sums[index] = packed_layer_penalty_sums(
                    hidden, self.bos_positions, self.token_mask, packed.sequence, packed.num_sequences, form
                )

        return hook


class CallRegistry:
    """The running calls, one per thread; thread-safe.

    A copy (``copy.deepcopy``, pickle, ``torch.save`` of the model) starts with no running call and a lock of its own:
    a call belongs to the forward pass of the model it was started on.
    """

    def __init__(self) -> None:
        self._calls: dict[int, SinkCall] = {}
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self.__init__()

    def start(self, call: SinkCall, layers: nn.ModuleList) -> None:
        with self._lock:
            self._finish_locked(call.thread)
            call.attach(layers)
            self._calls[call.thread] = call

    def finish(self) -> SinkCall | None:
        """End the current thread's call (removing its hooks) and return it; None when it has none."""
        with self._lock:
            return self._finish_locked(threading.get_ident())

    def finish_all(self) -> None:
        with self._lock:
            for thread in list(self._calls):
                self._finish_locked(thread)

    def _finish_locked(self, thread: int) -> SinkCall | None:
        call = self._calls.pop(thread, None)
        if call is not None:
            call.detach()
        return call

    def __len__(self) -> int:
        return len(self._calls)


def checkpoints_call(layer: nn.Module) -> bool:
    """Whether ``layer``'s class overrides ``nn.Module.__call__`` (transformers < 5.23 checkpoints ``__call__``)."""
    for cls in type(layer).__mro__:
        if cls is nn.Module:
            return False
        if "__call__" in vars(cls):
            return True
    return False


def check_gradient_checkpointing(layers: nn.ModuleList, indices: list[int]) -> None:
    """Raise when a chosen layer is checkpointed in a way that would lose (or break) the decorrelation gradient."""
    if not torch.is_grad_enabled():
        return
    for index in indices:
        layer = layers[index]
        if getattr(layer, "gradient_checkpointing", False) and checkpoints_call(layer):
            import transformers

            raise RuntimeError(
                f"gradient checkpointing is on for decoder layer {index} ({type(layer).__name__}), whose class "
                f"checkpoints __call__ (transformers {transformers.__version__}), so the decorrelation loss's layer "
                "hooks would run inside the checkpoint: non-reentrant checkpointing raises CheckpointError and "
                "reentrant checkpointing silently drops the loss's gradient. Install "
                f"transformers>={FIRST_TRANSFORMERS_WITH_HOOKS_OUTSIDE_CHECKPOINT} (it checkpoints forward, with "
                "hooks outside), or disable gradient checkpointing."
            )

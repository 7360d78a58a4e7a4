"""Packed rows (padding-free batches): several sequences in one row, told apart by their ``position_ids``.

TRL's ``SFTTrainer(packing=True)`` and transformers' ``DataCollatorWithFlattening`` give rows that hold many
sequences, with ``position_ids`` that restart at every sequence and no ``attention_mask``. transformers then keeps the
sequences apart in attention (a new sequence starts wherever ``position_ids`` does not go up by one, see
``transformers.masking_utils.find_packed_sequence_indices``); the decorrelation loss must do the same: every packed
sequence is compared with its own BOS, over its own tokens, and weighted as one sequence of a padded batch.

``PackedLayout`` maps the packed ``(B, T)`` positions onto an unpacked ``(S, L)`` view (one row per sequence, right
padded): the token bookkeeping (BOS, selected tokens, label counts) runs on the unpacked view with the same code as a
padded batch, and the per-layer sums run on the packed hidden states (no copy of them).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PackedLayout:
    """Where every token of a packed ``(B, T)`` batch sits in the unpacked ``(S, L)`` view."""

    sequence: torch.Tensor  # (B, T) long: index of the token's sequence, 0 .. S-1 over the whole batch
    offset: torch.Tensor  # (B, T) long: position of the token within its sequence
    start: torch.Tensor  # (B, T) long: packed position (in the row) of its sequence's first token
    lengths: torch.Tensor  # (S,) long: tokens of every sequence
    num_sequences: int
    max_length: int

    def unpack(self, packed: torch.Tensor, fill) -> torch.Tensor:
        """``(B, T, ...)`` → ``(S, L, ...)``, positions past a sequence's end set to ``fill``."""
        out = packed.new_full((self.num_sequences, self.max_length, *packed.shape[2:]), fill)
        out[self.sequence, self.offset] = packed.to(out.device)
        return out

    def pack(self, unpacked: torch.Tensor) -> torch.Tensor:
        """``(S, L, ...)`` → ``(B, T, ...)``."""
        return unpacked[self.sequence, self.offset]


def sequence_starts(position_ids: torch.Tensor) -> torch.Tensor:
    """Bool mask, shaped like ``position_ids`` ``(B, T)``, of the tokens that begin a sequence: the first of a row and
    every token whose position does not follow the previous one's by one (transformers' rule for packed rows)."""
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = position_ids.diff(dim=-1) != 1
    return starts


def packed_layout(position_ids: torch.Tensor | None, batch_size: int, seq_len: int) -> PackedLayout | None:
    """The layout of the sequences packed in rows of ``position_ids`` (``(B, T)`` or ``(1, T)``), or None when no row
    holds more than one sequence. A sequence starts at the beginning of a row and wherever ``position_ids`` does not
    go up by one, the rule transformers' attention masks follow."""
    if position_ids is None or position_ids.dim() != 2 or position_ids.shape[-1] != seq_len:
        return None
    positions = position_ids.expand(batch_size, -1)
    starts = sequence_starts(positions)
    if not bool(starts[:, 1:].any()):
        return None
    in_row = starts.long().cumsum(dim=1) - 1  # (B, T): sequence index within the row
    per_row = in_row[:, -1] + 1
    sequence = in_row + (per_row.cumsum(0) - per_row)[:, None]
    columns = torch.arange(seq_len, device=positions.device).expand(batch_size, -1)
    start = torch.where(starts, columns, torch.zeros_like(columns)).cummax(dim=1).values
    num_sequences = int(per_row.sum())
    lengths = torch.zeros(num_sequences, dtype=torch.long, device=positions.device)
    lengths.index_add_(0, sequence.flatten(), torch.ones_like(sequence.flatten()))
    return PackedLayout(sequence, columns - start, start, lengths, num_sequences, int(lengths.max()))

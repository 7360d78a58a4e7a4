"""The per-modality projector: compress time by a rate K (stack or average K frames), then an MLP to the LLM width."""

from __future__ import annotations

import math

import torch
from torch import nn


class ModalityProjector(nn.Module):
    """Compresses encoder frames by ``rate`` and maps them to the LLM width (Llama-AVSR's projector).

    ``mode="stack"`` concatenates ``rate`` consecutive frames (``[B, T, D] → [B, ⌈T/rate⌉, rate·D]``);
    ``mode="avg"`` averages them (AvgPool1d, as in the sink paper). Padding frames never enter a valid token: each
    utterance gives ``⌈length/rate⌉`` tokens. Then ``Linear → ReLU → Linear`` (optionally LayerNorm).
    """

    def __init__(
        self, in_dim: int, out_dim: int, rate: int, mode: str = "stack", hidden: int = 2048, layer_norm: bool = False
    ):
        super().__init__()
        if rate < 1:
            raise ValueError(f"downsampling rate must be >= 1, got {rate}")
        if mode not in ("stack", "avg"):
            raise ValueError(f"projector mode must be 'stack' or 'avg', got {mode!r}")
        self.rate, self.mode = rate, mode
        width = in_dim * rate if mode == "stack" else in_dim
        layers: list[nn.Module] = [nn.Linear(width, hidden), nn.ReLU(), nn.Linear(hidden, out_dim)]
        if layer_norm:
            layers.append(nn.LayerNorm(out_dim))
        self.mlp = nn.Sequential(*layers)

    def downsample(self, feats: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[B, T, D]`` frames and valid lengths → compressed ``[B, T', D']`` and new lengths (no MLP)."""
        b, t, d = feats.shape
        k = self.rate
        t_out = math.ceil(t / k)
        valid = (torch.arange(t_out * k, device=feats.device)[None] < lengths[:, None].to(feats.device)).to(
            feats.dtype
        )
        feats = nn.functional.pad(feats, (0, 0, 0, t_out * k - t)) * valid[..., None]  # zero the padding
        groups = feats.view(b, t_out, k, d)  # B, T', K, D
        if self.mode == "stack":
            out = groups.reshape(b, t_out, k * d)
        else:
            out = groups.sum(2) / valid.view(b, t_out, k).sum(2, keepdim=True).clamp(min=1)
        return out, torch.div(lengths + k - 1, k, rounding_mode="floor")

    def forward(self, feats: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out, new_lengths = self.downsample(feats, lengths)
        return self.mlp(out), new_lengths

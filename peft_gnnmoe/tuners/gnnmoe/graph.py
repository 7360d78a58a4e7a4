"""Token graphs for the router, built for a whole batch with plain torch ops.

A batch of B images with S tokens each becomes one graph of B * S nodes (node ``b * S + i`` is token ``i`` of image
``b``), the layout torch_geometric's layers expect. Tokens ``[0, P)`` are special (CLS, distillation, registers),
tokens ``[P, S)`` are patches on an H x W grid in row-major order. Edges:

- ``knn``: each patch to its k most cosine-similar patches (features of the layer input), symmetrised;
- ``grid``: each patch to its 4 spatial neighbours (the adjacency is computed once per grid size and cached);
- special tokens: linked to every patch and to each other (``connect``) or to nothing (``isolated``).

With a token mask (``valid``, B x S, from the model call's attention mask), masked tokens (padding) are no graph
nodes: no edge enters or leaves them and they are never kNN candidates, so the real tokens' graph does not depend on
the padding.

torch_cluster's ``knn_graph`` is not needed: the batched similarity and ``topk`` do the same on any install.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class TokenLayout:
    """Where the special tokens and the patch grid sit in a token sequence."""

    num_prefix: int
    grid: tuple[int, int] | None  # None: the patches have no known 2-D layout


def infer_layout(
    num_tokens: int,
    num_prefix: int,
    grid_hint: tuple[int, int] | None,
    need_grid: bool,
    explicit_grid: bool = False,
    square_fallback: bool = True,
) -> TokenLayout:
    """Work out the patch grid of a sequence of ``num_tokens`` tokens.

    The hint (from the model config, or ``patch_grid`` of the adapter config when ``explicit_grid``) wins when it
    matches the patch count. Otherwise an explicit ``patch_grid`` is an error when the graph needs a grid; a hint from
    the model config gives way to the square grid of a square patch count (a ViT run at another resolution) unless
    ``square_fallback`` is False (patches in no spatial order, e.g. ViT-MAE's shuffled patches). When no grid fits
    and the graph needs one (``grid`` or ``knn+grid``), raise an error that says how to fix it.
    """
    num_patches = num_tokens - num_prefix
    if num_patches < 0:
        raise ValueError(
            f"GNN-MoE router saw {num_tokens} tokens but expects {num_prefix} special tokens in front of the patches. "
            "Set GNNMoEConfig(num_prefix_tokens=...) to the right count."
        )
    if grid_hint is not None and grid_hint[0] * grid_hint[1] == num_patches:
        return TokenLayout(num_prefix, (int(grid_hint[0]), int(grid_hint[1])))
    if explicit_grid and need_grid:
        raise ValueError(
            f"GNNMoEConfig(patch_grid={list(grid_hint)}) holds {grid_hint[0] * grid_hint[1]} patches, but the layer "
            f"sees {num_patches} patch tokens (= {num_tokens} tokens - {num_prefix} special tokens). Set patch_grid "
            "to the [rows, cols] of the images you feed, or None to read it from the model config."
        )
    side = math.isqrt(num_patches)
    if square_fallback and not explicit_grid and num_patches > 0 and side * side == num_patches:
        return TokenLayout(num_prefix, (side, side))
    if need_grid:
        raise ValueError(
            f"GNN-MoE cannot place {num_patches} patch tokens (= {num_tokens} tokens - {num_prefix} special tokens) "
            f"on a grid (hint: {grid_hint}). Set GNNMoEConfig(patch_grid=[rows, cols]) and/or num_prefix_tokens, "
            "or use graph='knn', which needs no grid."
        )
    return TokenLayout(num_prefix, None)


@lru_cache(maxsize=32)
def _grid_adjacency(rows: int, cols: int, device: torch.device) -> torch.Tensor:
    """(rows*cols, rows*cols) bool adjacency of the 4-neighbour grid; cached per grid size and device."""
    index = torch.arange(rows * cols, device=device).view(rows, cols)
    adj = torch.zeros(rows * cols, rows * cols, dtype=torch.bool, device=device)
    right = (index[:, :-1].reshape(-1), index[:, 1:].reshape(-1))
    down = (index[:-1, :].reshape(-1), index[1:, :].reshape(-1))
    for a, b in (right, down):
        adj[a, b] = True
        adj[b, a] = True
    return adj


@torch.no_grad()
def build_token_graph(
    x: torch.Tensor,
    layout: TokenLayout,
    mode: str,
    knn_k: int,
    prefix_mode: str,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Edge index (2, num_edges) of the batched token graph of ``x`` (B, S, D); messages flow from row 0 to row 1.

    ``valid`` (B, S) bool marks the real tokens; None means every token is real.
    """
    batch, seq, _ = x.shape
    p = layout.num_prefix
    num_patches = seq - p
    pairs = None if valid is None else valid[:, :, None] & valid[:, None, :]  # B, S, S: both ends real
    adj = torch.zeros(batch, seq, seq, dtype=torch.bool, device=x.device)
    patches = adj[:, p:, p:]  # view: B, Np, Np
    if "knn" in mode and num_patches > 1:
        feats = F.normalize(x[:, p:].float(), dim=-1)
        sim = feats @ feats.transpose(1, 2)  # B, Np, Np cosine similarity
        if pairs is not None:
            sim = sim.masked_fill(~pairs[:, p:, p:], float("-inf"))  # padding is never a candidate
        sim.diagonal(dim1=1, dim2=2).fill_(float("-inf"))
        top = sim.topk(min(knn_k, num_patches - 1), dim=-1)  # B, Np, k
        patches.scatter_(-1, top.indices, top.values > float("-inf"))  # fewer real candidates than k: keep those
        patches |= patches.transpose(1, 2).clone()
    if "grid" in mode and layout.grid is not None and num_patches > 1:
        patches |= _grid_adjacency(layout.grid[0], layout.grid[1], x.device)
    if p > 0 and prefix_mode == "connect" and seq > 1:
        adj[:, :p, :] = True
        adj[:, :, :p] = True
        adj.diagonal(dim1=1, dim2=2).fill_(False)
    if pairs is not None:
        adj &= pairs
    b, target, source = adj.nonzero(as_tuple=True)
    offset = b * seq
    return torch.stack([source + offset, target + offset])

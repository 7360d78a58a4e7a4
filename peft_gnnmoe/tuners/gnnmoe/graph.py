"""Token graphs for the router, built for a whole batch with plain torch ops.

Every image of a batch has the same S tokens, so the graphs are one dense (B, S, S) adjacency, the layout of
torch_geometric's dense layers. Tokens ``[0, P)`` are special (CLS, distillation, registers), tokens ``[P, S)`` are
patches on an H x W grid in row-major order. Edges (graph modes, united with ``+``):

- ``knn``: each patch to its k most cosine-similar patches (features of the layer input), symmetrised;
- ``grid``: each patch to its 4 spatial neighbours; ``grid8``: to its 8 neighbours (diagonals too);
- ``radius``: patches j, k whose grid coordinates are within Euclidean distance r (``graph_radius``);
- ``full``: every patch to every other patch;
- special tokens: linked to every patch and to each other (``connect``) or to nothing (``isolated``).

The spatial adjacencies are computed once per grid size and cached; the kNN part once per routing call.

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
    and the graph needs one (a mode with ``grid``, ``grid8`` or ``radius``), raise an error that says how to fix it.
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


SPATIAL_MODES = ("grid", "grid8", "radius")  # graph modes with a spatial part: they need a patch grid


def needs_grid(mode: str) -> bool:
    """Whether graph ``mode`` links patches by their grid position (and so needs a patch grid)."""
    return any(part in SPATIAL_MODES for part in mode.split("+"))


@lru_cache(maxsize=64)
def _spatial_adjacency(rule: str, rows: int, cols: int, radius: float, device: torch.device) -> torch.Tensor:
    """(rows*cols, rows*cols) bool adjacency of the patch grid under ``rule``, no self loops; cached per grid.

    ``grid``: the 4 nearest neighbours, ``grid8``: the 8 neighbours (diagonals too), ``radius``: every patch whose
    grid coordinates lie within Euclidean distance ``radius``. Built outside inference mode, so that a cache filled
    under ``torch.inference_mode()`` still serves training.
    """
    with torch.inference_mode(False):
        r, c = torch.meshgrid(torch.arange(rows, device=device), torch.arange(cols, device=device), indexing="ij")
        coords = torch.stack([r.reshape(-1), c.reshape(-1)], dim=-1)
        diff = (coords[:, None, :] - coords[None, :, :]).abs()
        if rule == "grid":
            adj = diff.sum(-1) == 1
        elif rule == "grid8":
            adj = diff.amax(-1) == 1
        elif rule == "radius":
            dist2 = diff.pow(2).sum(-1)
            adj = (dist2 > 0) & (dist2 <= radius * radius + 1e-9)
        else:
            raise ValueError(f"Unknown spatial graph rule {rule!r}; use one of {SPATIAL_MODES}.")
        return adj


def _knn_adjacency(patches: torch.Tensor, knn_k: int, pairs: torch.Tensor | None) -> torch.Tensor:
    """(B, Np, Np) bool: each patch linked to its ``knn_k`` most cosine-similar real patches, symmetrised."""
    num_patches = patches.shape[1]
    feats = F.normalize(patches.float(), dim=-1)
    sim = feats @ feats.transpose(1, 2)  # B, Np, Np cosine similarity
    blocked = torch.eye(num_patches, dtype=torch.bool, device=sim.device)
    if pairs is not None:
        blocked = blocked | ~pairs  # padding is never a candidate
    sim = sim.masked_fill(blocked, float("-inf"))
    top = sim.topk(min(knn_k, num_patches - 1), dim=-1)  # B, Np, k
    adj = torch.zeros_like(sim, dtype=torch.bool).scatter(-1, top.indices, top.values > float("-inf"))
    return adj | adj.transpose(1, 2)  # fewer real candidates than k: keep those


def token_adjacency(
    x: torch.Tensor,
    layout: TokenLayout,
    mode: str,
    knn_k: int,
    prefix_mode: str,
    valid: torch.Tensor | None = None,
    radius: float = 2.0,
) -> torch.Tensor:
    """Dense adjacency (B, S, S) bool of the token graphs of ``x`` (B, S, D): ``adj[b, i, j]`` links token ``j`` to
    token ``i`` of image ``b`` (every graph here is undirected, so the matrix is symmetric). No self loops: the
    graph convolutions add their own.

    ``mode`` is ``knn``, ``grid``, ``grid8``, ``radius``, ``full`` or a ``+``-union such as ``knn+grid``.
    ``valid`` (B, S) bool marks the real tokens; None means every token is real.
    """
    batch, seq, _ = x.shape
    p = layout.num_prefix
    num_patches = seq - p
    parts = mode.split("+")
    pairs = None if valid is None else valid[:, :, None] & valid[:, None, :]  # B, S, S: both ends real
    with torch.no_grad():
        patch_adj = torch.zeros(1, num_patches, num_patches, dtype=torch.bool, device=x.device)
        if num_patches > 1:
            if "full" in parts:
                patch_adj = ~torch.eye(num_patches, dtype=torch.bool, device=x.device)[None]
            if "knn" in parts:
                patch_pairs = None if pairs is None else pairs[:, p:, p:]
                patch_adj = patch_adj | _knn_adjacency(x[:, p:], knn_k, patch_pairs)
            for rule in SPATIAL_MODES:
                if rule in parts and layout.grid is not None:
                    rows, cols = layout.grid
                    # torch.compile traces the builder itself (a constant of the graph) instead of the Python cache
                    build = _spatial_adjacency.__wrapped__ if torch.compiler.is_compiling() else _spatial_adjacency
                    patch_adj = patch_adj | build(rule, rows, cols, float(radius), x.device)
        adj = F.pad(patch_adj, (p, 0, p, 0)).expand(batch, seq, seq)
        if p > 0 and prefix_mode == "connect" and seq > 1:
            prefix = torch.zeros(seq, dtype=torch.bool, device=x.device)
            prefix[:p] = True
            links = (prefix[:, None] | prefix[None, :]) & ~torch.eye(seq, dtype=torch.bool, device=x.device)
            adj = adj | links
        if pairs is not None:
            adj = adj & pairs
        return adj


def build_token_graph(
    x: torch.Tensor,
    layout: TokenLayout,
    mode: str,
    knn_k: int,
    prefix_mode: str,
    valid: torch.Tensor | None = None,
    radius: float = 2.0,
) -> torch.Tensor:
    """Edge index (2, num_edges) of the batched token graph of ``x`` (B, S, D), node ``b * S + i`` being token ``i``
    of image ``b``; messages flow from row 0 to row 1. The sparse form of [`token_adjacency`] (same arguments),
    for torch_geometric's message-passing layers and for inspection."""
    seq = x.shape[1]
    b, target, source = token_adjacency(x, layout, mode, knn_k, prefix_mode, valid, radius).nonzero(as_tuple=True)
    offset = b * seq
    return torch.stack([source + offset, target + offset])

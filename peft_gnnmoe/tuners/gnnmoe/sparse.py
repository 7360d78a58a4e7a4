"""Sparse top-k dispatch: every Kronecker expert runs on the tokens routed to it, not on all of them.

The dense orders of ``kronecker.py`` apply all E experts to every token and let the zero gates discard E - k of
them, so their cost grows with E. Here the T * k (token, choice) assignments are sorted by expert; each expert's
contiguous block of rows meets its factors in the fewest multiply-adds order of ``kron_moe_forward_blocked`` (the
rules, shared by the experts, contract all rows at once), and every row's output, weighted by its gate, is added
back to its token. Work and memory grow with ``T * k``, whatever E and however unevenly the tokens are routed.

Every expert takes part, also one that received no token (an empty block), so its parameters get a zero gradient,
as in the dense orders: DDP and FSDP need no ``find_unused_parameters``. With ``recompute`` (the default) the experts
run under activation checkpointing: the backward pass keeps the tokens, the sorted indices and the gates, and
computes the rows, the intermediates and the outputs (k copies of every token's input and output) again.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint


@dataclass(frozen=True)
class Dispatch:
    """The T * k assignments sorted by expert: row ``i`` is assignment ``assignment[i]`` (flattened (token, choice))
    of token ``token[i]``; expert ``e`` has ``counts[e]`` consecutive rows."""

    token: torch.Tensor  # T * k
    assignment: torch.Tensor  # T * k
    expert: torch.Tensor  # T * k: the expert of every row
    counts: list[int]


def dispatch_tokens(topk_index: torch.Tensor, num_experts: int) -> Dispatch:
    """Sort the T tokens' assignments by their chosen experts ``topk_index`` (T, k)."""
    k = topk_index.shape[-1]
    expert = topk_index.reshape(-1)
    order = expert.argsort(stable=True)
    counts = torch.bincount(expert, minlength=num_experts).tolist()  # the one host synchronisation of a routing
    token = order // k
    return Dispatch(token=token, assignment=order, expert=expert[order], counts=counts)


def kron_experts_grouped(
    rows: torch.Tensor, counts: list[int], rules: torch.Tensor, left: torch.Tensor, right: torch.Tensor
) -> torch.Tensor:
    """``x H_e`` for every row, expert ``e`` taking the next ``counts[e]`` rows; shape (rows, out_features)."""
    num_experts, n, p, r = left.shape
    q = right.shape[-1]
    total = rows.shape[0]
    lefts = left.permute(0, 2, 1, 3).reshape(num_experts, p, n * r)
    blocks = rows.view(total * n, p).split([c * n for c in counts])  # each expert's rows, one block row a at a time
    u = torch.cat([block @ lefts[e] for e, block in enumerate(blocks)])  # (rows a), (k r)
    u = u.view(total, n, n, r).permute(2, 0, 3, 1).reshape(n, total * r, n)  # k, (rows r), a
    z = (u @ rules).view(n, total, r, n).permute(1, 3, 0, 2).reshape(total * n, n * r)  # (rows c), (k r)
    rights = right.reshape(num_experts, n * r, q)
    y = torch.cat([block @ rights[e] for e, block in enumerate(z.split([c * n for c in counts]))])  # (rows c), d
    return y.view(total, n * q)


def kron_moe_forward_sparse(
    x: torch.Tensor,
    gates: torch.Tensor,
    topk_index: torch.Tensor,
    rules: torch.Tensor,
    left: torch.Tensor,
    right: torch.Tensor,
    bias: torch.Tensor | None,
    dispatch: Dispatch | None = None,
    recompute: bool = True,
) -> torch.Tensor:
    """``kron_moe_forward`` on the chosen experts only: ``sum_j gates[t, e_j] (x_t H_{e_j} + bias_{e_j})``.

    Args:
        x: tokens, shape (..., in_features).
        gates: routing weights, shape (..., E), read at ``topk_index`` only.
        topk_index: the chosen experts, shape (..., k).
        dispatch: ``dispatch_tokens(topk_index, E)`` when the caller has it already (q / k / v share it).
        recompute: run the experts under activation checkpointing (keep their inputs only).

    Returns:
        Tensor of shape (..., out_features), equal to the dense orders' result.
    """
    num_experts = left.shape[0]
    lead = x.shape[:-1]
    k = topk_index.shape[-1]
    tokens = x.reshape(-1, x.shape[-1])
    index = topk_index.reshape(-1, k)
    if dispatch is None:
        dispatch = dispatch_tokens(index, num_experts)
    weights = gates.reshape(-1, num_experts).gather(1, index).reshape(-1)[dispatch.assignment]
    if recompute and torch.is_grad_enabled():
        out = checkpoint(_mix, tokens, weights, dispatch, rules, left, right, bias, use_reentrant=False)
    else:
        out = _mix(tokens, weights, dispatch, rules, left, right, bias)
    return out.reshape(*lead, out.shape[-1])


def _mix(
    tokens: torch.Tensor,
    weights: torch.Tensor,
    dispatch: Dispatch,
    rules: torch.Tensor,
    left: torch.Tensor,
    right: torch.Tensor,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """Every row through its expert, weighted by its gate ``weights`` (sorted as the rows), added to its token."""
    y = kron_experts_grouped(tokens.index_select(0, dispatch.token), dispatch.counts, rules, left, right)
    if bias is not None:
        y = y + bias.to(y.dtype).index_select(0, dispatch.expert)
    weighted = y * weights.to(y.dtype)[:, None]
    return y.new_zeros(tokens.shape[0], y.shape[-1]).index_add(0, dispatch.token, weighted)

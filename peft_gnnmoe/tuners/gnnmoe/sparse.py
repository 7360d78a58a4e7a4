"""Sparse top-k dispatch: every Kronecker expert runs on the tokens routed to it, not on all of them.

The dense orders of ``kronecker.py`` apply all E experts to every token and let the zero gates discard E - k of
them, so their cost grows with E. Here the T * k (token, choice) assignments are sorted by expert; each expert's
contiguous block of rows meets its factors in the fewest multiply-adds order of ``kron_moe_forward_blocked`` (the
rules, shared by the experts, contract all rows at once), and every row's output, weighted by its gate, is added
back to its token. Work and memory grow with ``T * k``, whatever E and however unevenly the tokens are routed.

Every expert takes part, also one that received no token (an empty block), so its parameters get a zero gradient,
as in the dense orders: DDP and FSDP need no ``find_unused_parameters``. With ``recompute`` (the default) the
backward pass keeps the tokens, the sorted indices and the gates, and gathers the rows (k copies of every token's
input) and recomputes the two intermediates again, but not the outputs: the gates' gradient is the product of the
intermediate ``z`` with its gradient, which the backward pass computes anyway.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .recompute import replay_autocast, save_autocast


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


def _per_expert(
    blocks: torch.Tensor, weights: torch.Tensor, sizes: list[int], transpose_block: bool = False
) -> torch.Tensor:
    """``block_e @ weights[e]`` (or ``block_eᵀ @ weights_e`` with ``transpose_block``, the ``e``-th block of
    ``weights`` then) for the consecutive row blocks of ``sizes``."""
    parts = blocks.split(sizes)
    if transpose_block:
        return torch.stack([a.t() @ b for a, b in zip(parts, weights.split(sizes))])
    return torch.cat([block @ weights[e] for e, block in enumerate(parts)])


def _left_matrices(left: torch.Tensor) -> torch.Tensor:
    """The left factors (E, n, p, r) as one (p, n r) matrix per expert: (E, p, n r)."""
    num_experts, n, p, r = left.shape
    return left.permute(0, 2, 1, 3).reshape(num_experts, p, n * r)


def _grouped_intermediates(rows, counts, rules, left):
    """The grouped order up to its last matmul, expert ``e`` taking the next ``counts[e]`` rows: the left factors as
    (E, p, n r) matrices, ``u`` (k, rows r, a) and the rules applied, ``z`` ((rows c), (k r)); the last matmul is
    ``z`` times each expert's right factors."""
    _, n, p, r = left.shape
    total = rows.shape[0]
    lefts = _left_matrices(left)
    u = _per_expert(rows.view(total * n, p), lefts, [c * n for c in counts])  # (rows a), (k r)
    u = u.view(total, n, n, r).permute(2, 0, 3, 1).reshape(n, total * r, n)  # k, (rows r), a
    z = (u @ rules).view(n, total, r, n).permute(1, 3, 0, 2).reshape(total * n, n * r)  # (rows c), (k r)
    return lefts, u, z


class SparseKronExperts(torch.autograd.Function):
    """``sum_j gates[t, e_j] (x_t H_{e_j} + bias_{e_j})`` over the rows of ``dispatch`` (``weights``: the rows'
    gates); keeps the tokens, the gates and the factors for the backward pass, which gathers the rows and recomputes
    the two intermediates but not the outputs (``keep``: keeps the rows and intermediates too)."""

    @staticmethod
    def forward(ctx, tokens, weights, rules, left, right, bias, dispatch: Dispatch, keep: bool):
        num_experts, n, _, r = left.shape
        q = right.shape[-1]
        rows = tokens.index_select(0, dispatch.token)
        _, u, z = _grouped_intermediates(rows, dispatch.counts, rules, left)
        sizes = [c * n for c in dispatch.counts]
        y = _per_expert(z, right.reshape(num_experts, n * r, q), sizes).view(rows.shape[0], n * q)
        if bias is not None:
            y = y + bias.to(y.dtype).index_select(0, dispatch.expert)
        weighted = y * weights.to(y.dtype)[:, None]
        ctx.save_for_backward(tokens, weights, rules, left, right, bias, *((rows, u, z) if keep else ()))
        ctx.dispatch = dispatch
        save_autocast(ctx, tokens.device.type)
        return y.new_zeros(tokens.shape[0], y.shape[-1]).index_add_(0, dispatch.token, weighted)

    @staticmethod
    def backward(ctx, grad_out):
        tokens, weights, rules, left, right, bias, *kept = ctx.saved_tensors
        dispatch = ctx.dispatch
        num_experts, n, p, r = left.shape
        q = right.shape[-1]
        sizes = [c * n for c in dispatch.counts]
        with replay_autocast(ctx):
            if kept:
                rows, u, z = kept
                lefts = _left_matrices(left)
            else:
                rows = tokens.index_select(0, dispatch.token)
                lefts, u, z = _grouped_intermediates(rows, dispatch.counts, rules, left)
            total = rows.shape[0]
            grad_rows_out = grad_out.index_select(0, dispatch.token)  # rows, out
            rights = right.reshape(num_experts, n * r, q)
            # d z without the gate: its product with z is the gate's gradient (the expert's output never formed)
            dz = _per_expert(grad_rows_out.reshape(total * n, q), rights.transpose(1, 2), sizes)  # (rows c), (k r)
            grad_weights = (dz.reshape(total, n * n * r) * z.reshape(total, n * n * r)).sum(-1)
            if bias is not None:
                grad_weights = grad_weights + (grad_rows_out * bias.to(grad_rows_out.dtype)[dispatch.expert]).sum(-1)
            gated_out = grad_rows_out * weights.to(grad_rows_out.dtype)[:, None]
            grad_bias = None
            if bias is not None and ctx.needs_input_grad[5]:
                grad_bias = torch.zeros_like(bias, dtype=gated_out.dtype).index_add_(0, dispatch.expert, gated_out)
                grad_bias = grad_bias.to(bias.dtype)
            grad_right = _per_expert(z, gated_out.reshape(total * n, q), sizes, transpose_block=True)
            dz = (dz.reshape(total, n, n * r) * weights.to(dz.dtype)[:, None, None]).view(total, n, n, r)
            dz = dz.permute(2, 0, 3, 1).reshape(n, total * r, n)  # k, (rows r), c: the layout of u @ rules
            grad_rules = u.transpose(-1, -2) @ dz
            du = (dz @ rules.transpose(-1, -2)).view(n, total, r, n).permute(1, 3, 0, 2).reshape(total * n, n * r)
            blocks = rows.view(total * n, p)
            grad_left = _per_expert(blocks, du, sizes, transpose_block=True)  # E, p, (k r)
            grad_left = grad_left.view(num_experts, p, n, r).permute(0, 2, 1, 3)
            grad_tokens = None
            if ctx.needs_input_grad[0]:
                grad_rows = _per_expert(du, lefts.transpose(1, 2), sizes).view(total, n * p)
                grad_tokens = torch.zeros_like(tokens, dtype=grad_rows.dtype).index_add_(0, dispatch.token, grad_rows)
                grad_tokens = grad_tokens.to(tokens.dtype)
        return (
            grad_tokens,
            grad_weights.view_as(weights),
            grad_rules.view_as(rules),
            grad_left.to(left.dtype),
            grad_right.view_as(right),
            grad_bias,
            None,
            None,
        )


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
        recompute: keep only the tokens, gates and indices for the backward pass, which recomputes the rest.

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
    out = SparseKronExperts.apply(tokens, weights, rules, left, right, bias, dispatch, not recompute)
    return out.reshape(*lead, out.shape[-1])

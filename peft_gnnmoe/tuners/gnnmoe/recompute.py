"""Expert contractions that keep only their inputs for the backward pass.

Autograd keeps every intermediate of a contraction until the backward pass. For the blocked order of
``kronecker.py`` that is three tensors of ``E n r n`` numbers per token (on the ViT-S/16 shape as large as the
layer's input, 110 MB on 24 layers at batch 8); for the dense order the gated tokens (``E in`` numbers per token).
These functions keep the tokens, the gates and the weight-sized tensors, and recompute the intermediates in the
backward pass: one more matmul of the forward pass's size for the blocked order (six become seven; with
``recompute_intermediates=False`` it keeps them), one elementwise product for the dense order (always). Under
autocast the backward pass runs in the forward pass's autocast state.
"""

from __future__ import annotations

import torch
from torch.autograd.function import FunctionCtx


def save_autocast(ctx: FunctionCtx, device_type: str) -> None:
    ctx.device_type = device_type
    ctx.autocast = torch.is_autocast_enabled(device_type)
    ctx.autocast_dtype = torch.get_autocast_dtype(device_type)


def replay_autocast(ctx: FunctionCtx) -> torch.autocast:
    return torch.autocast(ctx.device_type, dtype=ctx.autocast_dtype, enabled=ctx.autocast)


def _left_matrix(left: torch.Tensor) -> torch.Tensor:
    """The left factors (E, n, p, r) as one (E n r, p) matrix, the left operand of ``U = L xᵀ``."""
    num_experts, n, p, r = left.shape
    return left.transpose(2, 3).reshape(num_experts * n * r, p)


def _blocked_intermediates(
    blocks: torch.Tensor, gates: torch.Tensor, rules: torch.Tensor, left: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The blocked order up to its last matmul: the left factors as one matrix, ``U = L xᵀ`` (e k r, T a), the rules
    applied ``z`` (e, k, r T, c) and the gated ``z`` (e, k r, T, c)."""
    num_experts, n, p, r = left.shape
    tokens = blocks.shape[0] // n
    lefts = _left_matrix(left)
    u = lefts @ blocks.t()
    z = u.view(num_experts, n, r * tokens, n) @ rules.unsqueeze(0)
    gated = z.view(num_experts, n * r, tokens, n) * gates.t().to(z.dtype)[:, None, :, None]
    return lefts, u, z, gated


class BlockedKronExperts(torch.autograd.Function):
    """``sum_e gates[t, e] x_t H_e`` in the blocked order (``kron_moe_forward_blocked``) for tokens ``x`` (T, in) and
    gates (T, E); keeps ``x``, the gates and the factors, not the order's three token-sized intermediates (``keep``:
    keeps those too, and the backward pass computes nothing twice)."""

    @staticmethod
    def forward(ctx, x, gates, rules, left, right, keep: bool = False):
        num_experts, n, p, r = left.shape
        q = right.shape[-1]
        _, u, z, gated = _blocked_intermediates(x.reshape(-1, p), gates, rules, left)
        y = gated.view(num_experts * n * r, -1).t() @ right.reshape(num_experts * n * r, q)  # (T c), d
        ctx.save_for_backward(x, gates, rules, left, right, *((u, z, gated) if keep else ()))
        save_autocast(ctx, x.device.type)
        return y.view(x.shape[0], n * q)

    @staticmethod
    def backward(ctx, grad_y):
        x, gates, rules, left, right, *kept = ctx.saved_tensors
        num_experts, n, p, r = left.shape
        q = right.shape[-1]
        with replay_autocast(ctx):
            blocks = x.reshape(-1, p)
            tokens = x.shape[0]
            if kept:
                lefts, (u, z, gated) = _left_matrix(left), kept
            else:
                lefts, u, z, gated = _blocked_intermediates(blocks, gates, rules, left)
            dy = grad_y.reshape(tokens * n, q)
            grad_right = (gated.view(num_experts * n * r, tokens * n) @ dy).view_as(right)
            d_gated = (right.reshape(num_experts * n * r, q) @ dy.t()).view(num_experts, n * r, tokens, n)
            grad_gates = (d_gated * z.view_as(d_gated)).sum((1, 3)).t()
            dz = (d_gated * gates.t().to(d_gated.dtype)[:, None, :, None]).view(num_experts, n, r * tokens, n)
            grad_rules = (u.view(num_experts, n, r * tokens, n).transpose(-1, -2) @ dz).sum(0)
            du = (dz @ rules.transpose(-1, -2).unsqueeze(0)).view(num_experts * n * r, tokens * n)
            grad_left = (du @ blocks).view(num_experts, n, r, p).transpose(2, 3).contiguous()
            grad_x = (du.t() @ lefts).view_as(x) if ctx.needs_input_grad[0] else None
        return grad_x, grad_gates, grad_rules, grad_left, grad_right, None


class GatedExpertMatmul(torch.autograd.Function):
    """``gate_tokens(x, gates) @ weights`` (the dense order's matmul) for tokens ``x`` (T, in), gates (T, E) and the
    stacked expert weights (E in, out); keeps ``x`` and the gates, not the (T, E in) gated tokens: an elementwise
    product, always recomputed (keeping them cost more memory than the rest of the layer and saved ~1 % of a step)."""

    @staticmethod
    def forward(ctx, x, gates, weights):
        ctx.save_for_backward(x, gates, weights)
        save_autocast(ctx, x.device.type)
        return gate_tokens(x, gates) @ weights

    @staticmethod
    def backward(ctx, grad_y):
        x, gates, weights = ctx.saved_tensors
        num_experts = gates.shape[-1]
        with replay_autocast(ctx):  # one (T, E in) tensor at a time: the gated tokens, then their gradient
            grad_weights = gate_tokens(x, gates).t() @ grad_y if ctx.needs_input_grad[2] else None
            d_gated = (grad_y @ weights.t()).view(x.shape[0], num_experts, x.shape[1])
            grad_x = None
            if ctx.needs_input_grad[0]:
                grad_x = torch.bmm(gates.to(d_gated.dtype).unsqueeze(1), d_gated).squeeze(1)
            grad_gates = torch.bmm(d_gated, x.to(d_gated.dtype).unsqueeze(-1)).squeeze(-1)
        return grad_x, grad_gates, grad_weights


def gate_tokens(x: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
    """(T, E * in_features): row ``t`` holds ``[g_t1 x_t, ..., g_tE x_t]``, the input of the dense order's matmul."""
    num_experts = gates.shape[-1]
    g = gates.reshape(-1, num_experts, 1).to(x.dtype)
    return (g * x.reshape(-1, 1, x.shape[-1])).view(-1, num_experts * x.shape[-1])

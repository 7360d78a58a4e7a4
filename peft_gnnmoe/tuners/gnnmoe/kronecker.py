"""Kronecker (PHM) adapter experts, applied in factored form.

Expert ``e`` of a layer with ``in_features = n * p`` and ``out_features = n * q`` has the weight

    H_e = sum_k  S_k ⊗ (L_{e,k} R_{e,k})          (in_features x out_features, used as y = x H_e)

with ``n`` rule matrices ``S_k`` (n x n, shared by the experts), ``L_{e,k}`` (p x r) and ``R_{e,k}`` (r x q). Writing
the token as ``X = x.view(n, p)`` (row-major), ``(A ⊗ B)`` acts as ``x (A ⊗ B) = vec(Aᵀ X B)``, so

    x H_e = vec( sum_k S_kᵀ X L_{e,k} R_{e,k} ),

which costs O(E r n (in + out + n²)) per token and never forms ``H_e`` (``E * in * out`` numbers) in forward or
backward. The routing weights are folded in before the last contraction, so the experts' outputs are never
materialised one by one either. On narrow layers the rules are folded into the left factors first (a weight-only
tensor), trading ``n`` times the first matmul's multiply-adds for fewer kernels; on the narrowest (the embedded
64-wide backbone) the ``H_e`` themselves are cheaper than the factored order: the tokens, scaled by their gates, meet
all experts in one matmul (``kron_moe_forward_dense``). See ``kron_moe_forward`` for the choice.

Parameter shapes: ``rules`` (n, n, n) as [k, a, c]; ``left`` (E, n, p, r) as [e, k, b, r]; ``right`` (E, n, r, q) as
[e, k, r, d]; ``bias`` (E, out_features), optional.
"""

from __future__ import annotations

import math

import torch

from .recompute import BlockedKronExperts, GatedExpertMatmul


def kron_shapes(in_features: int, out_features: int, factor: int) -> tuple[int, int]:
    """Return (p, q) = (in_features / n, out_features / n), or raise if n does not tile the layer."""
    if in_features % factor or out_features % factor:
        divisors = [
            d for d in range(1, min(in_features, out_features) + 1) if in_features % d == 0 and out_features % d == 0
        ]
        raise ValueError(
            f"kron_factor={factor} cannot tile a {in_features} -> {out_features} layer: it must divide both "
            f"dimensions. Choose one of {divisors[-8:]} (or exclude this layer)."
        )
    return in_features // factor, out_features // factor


def init_kron_experts(
    in_features: int, out_features: int, num_experts: int, factor: int, rank: int, zero_right: bool = True
) -> dict[str, torch.Tensor]:
    """Fresh expert tensors; with ``zero_right`` the experts output exactly zero (adapted model == base)."""
    p, q = kron_shapes(in_features, out_features, factor)
    rules = torch.randn(factor, factor, factor) / math.sqrt(factor)
    left = torch.randn(num_experts, factor, p, rank) / math.sqrt(p)
    if zero_right:
        right = torch.zeros(num_experts, factor, rank, q)
    else:
        right = torch.randn(num_experts, factor, rank, q) / math.sqrt(rank * factor)
    bias = torch.zeros(num_experts, out_features)
    return {"rules": rules, "left": left, "right": right, "bias": bias}


# Fold the rules into the left factors (one weight-only tensor of in_features * E * n * n * r numbers) when it is
# at most this big: on narrow layers the saved kernel launches and copies outweigh the extra multiply-adds.
FOLD_MAX_NUMEL = 2**16
# Form the dense expert weights (E * in_features * out_features numbers) when they are at most this big and cost no
# more multiply-adds per token than the folded order.
DENSE_MAX_NUMEL = 2**16
# The sparse order (sparse.py) is taken from this many experts per chosen one. Measured by
# benchmarks/bench_kron_orders.py on 64- to 768-wide layers, forward + backward as training runs them (recomputing
# their intermediates; docs/results/benchmarks.md): with 8 per choice it took 0.35-0.72x the dense order's time at
# top-1 and top-2; with 4 per choice 0.64-1.10x at top-1 and 0.83-1.13x at top-2, losing on 64-wide layers (each
# chosen expert's output is materialised, where the dense orders sum the experts inside one matmul); with 2,
# 0.85-4.47x.
SPARSE_EXPERTS_PER_CHOICE = 8


def kron_path(
    in_features: int, out_features: int, num_experts: int, factor: int, rank: int, top_k: int | None = None
) -> str:
    """The order a layer's experts run in: ``"dense"``, ``"folded"`` or ``"blocked"`` (every expert on every token,
    ``kron_moe_forward``), or, given ``top_k``, ``"sparse"`` (each expert on its own tokens, ``sparse.py``).

    Per token, the dense order costs ``E in out`` multiply-adds, the folded one ``E n r (n in + out)``, the blocked one
    ``E n r (in + out + n²)`` in more, smaller kernels. Dense and folded are taken on narrow layers only (their
    weight-only tensors stay below ``DENSE_MAX_NUMEL`` / ``FOLD_MAX_NUMEL`` numbers). The sparse order does the
    blocked order's work for ``top_k`` experts instead of ``E``, plus grouping the tokens and adding their outputs
    back; it is taken where it measured faster, from ``SPARSE_EXPERTS_PER_CHOICE`` experts per chosen one.
    """
    if top_k is not None and num_experts >= top_k * SPARSE_EXPERTS_PER_CHOICE:
        return "sparse"
    dense_macs = in_features * out_features
    folded_macs = factor * rank * (factor * in_features + out_features)
    if num_experts * in_features * out_features <= DENSE_MAX_NUMEL and dense_macs <= folded_macs:
        return "dense"
    if in_features * num_experts * factor * factor * rank <= FOLD_MAX_NUMEL:
        return "folded"
    return "blocked"


def kron_moe_forward(
    x: torch.Tensor,
    gates: torch.Tensor,
    rules: torch.Tensor,
    left: torch.Tensor,
    right: torch.Tensor,
    bias: torch.Tensor | None,
    recompute: bool = True,
) -> torch.Tensor:
    """Mixture of Kronecker experts, ``sum_e gates[..., e] * (x H_e + bias_e)``.

    Args:
        x: tokens, shape (..., in_features).
        gates: routing weights, shape (..., E) (zero for unselected experts).
        rules, left, right, bias: expert parameters (see module docstring); ``bias`` may be None.
        recompute: the blocked order recomputes its token-sized intermediates in the backward pass
            (``recompute.py``); False keeps them. The dense order always recomputes its gated tokens.

    Returns:
        Tensor of shape (..., out_features).

    Three contraction orders give the same result (tests pin each); ``kron_path`` picks one from the layer's shape.
    """
    num_experts, n, p, r = left.shape
    path = kron_path(n * p, n * right.shape[-1], num_experts, n, r)
    if path == "dense":
        return kron_moe_forward_dense(x, gates, rules, left, right, bias)
    if path == "folded":
        return kron_moe_forward_folded(x, gates, rules, left, right, bias)
    return kron_moe_forward_blocked(x, gates, rules, left, right, bias, recompute)


def kron_moe_forward_dense(
    x: torch.Tensor,
    gates: torch.Tensor,
    rules: torch.Tensor,
    left: torch.Tensor,
    right: torch.Tensor,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """``kron_moe_forward`` through the dense expert weights: one matmul of the gated tokens with all ``H_e``.

    ``H[e, (a, b), (c, d)] = sum_k S_k[a, c] (L_{e,k} R_{e,k})[b, d]`` is built once per call (weight-only, no token
    dimension); then ``y = [g_1 x, ..., g_E x] [H_1; ...; H_E]``, the sum over the experts inside the matmul. The
    backward pass recomputes the gated tokens instead of keeping them (``recompute.GatedExpertMatmul``).
    """
    num_experts, n, p, _ = left.shape
    q = right.shape[-1]
    lead = x.shape[:-1]
    weights = torch.einsum("kac,ekbd->eabcd", rules, left @ right).reshape(num_experts * n * p, n * q)
    g = gates.reshape(-1, num_experts).to(x.dtype)
    y = GatedExpertMatmul.apply(x.reshape(-1, n * p), g, weights)
    if bias is not None:
        y = torch.addmm(y, g, bias)
    return y.reshape(*lead, n * q)


def kron_moe_forward_folded(
    x: torch.Tensor,
    gates: torch.Tensor,
    rules: torch.Tensor,
    left: torch.Tensor,
    right: torch.Tensor,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """``kron_moe_forward`` with the rules folded into the left factors: two matmuls and one gate multiply.

    ``M[(a, b), (c, e, k, r)] = S_k[a, c] L_{e,k}[b, r]`` is built once per call (no token dimension); then
    ``y = ((x M) * g) R`` with the gates broadcast over a 4-D view. No token-sized tensor is permuted or copied;
    the first matmul does ``n`` times the multiply-adds of the blocked order.
    """
    num_experts, n, p, r = left.shape
    q = right.shape[-1]
    lead = x.shape[:-1]
    folded = rules.permute(1, 2, 0)[:, None, :, None, :, None] * left.permute(2, 0, 1, 3)[None, :, None]
    g = gates.reshape(-1, num_experts).to(x.dtype)  # T, E
    u = x.reshape(-1, n * p) @ folded.reshape(n * p, n * num_experts * n * r)  # T, (c e k r)
    u = u.view(-1, n, num_experts, n * r) * g[:, None, :, None]
    y = (u.view(-1, num_experts * n * r) @ right.reshape(num_experts * n * r, q)).view(-1, n * q)  # (T c), d
    if bias is not None:
        y = torch.addmm(y, g, bias)
    return y.reshape(*lead, n * q)


def kron_moe_forward_blocked(
    x: torch.Tensor,
    gates: torch.Tensor,
    rules: torch.Tensor,
    left: torch.Tensor,
    right: torch.Tensor,
    bias: torch.Tensor | None,
    recompute: bool = True,
) -> torch.Tensor:
    """``kron_moe_forward`` in the order of fewest multiply-adds, experts-major so that nothing token-sized is copied.

    ``U = L xᵀ`` is laid out (e, k, r, t, a); the rules contract ``a`` as one batched matmul over (e, k); the gates
    scale the result (a 4-D broadcast); ``Uᵀ R`` sums over (e, k, r). Transposed operands go to BLAS as views.
    With ``recompute`` the backward pass recomputes ``U`` and ``z`` instead of keeping them
    (``recompute.BlockedKronExperts``).
    """
    num_experts, n, p, _ = left.shape
    q = right.shape[-1]
    lead = x.shape[:-1]
    g = gates.reshape(-1, num_experts).to(x.dtype)  # T, E
    y = BlockedKronExperts.apply(x.reshape(-1, n * p), g, rules, left, right, not recompute)  # T, out
    if bias is not None:
        y = torch.addmm(y, g, bias)
    return y.reshape(*lead, n * q)


def kron_expert_weights(rules: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """Dense expert weights ``H`` of shape (E, in_features, out_features) built with ``torch.kron``.

    A reference for tests and inspection only: the forward pass never calls it.
    """
    num_experts, n = left.shape[:2]
    weights = []
    for e in range(num_experts):
        h = sum(torch.kron(rules[k], left[e, k] @ right[e, k]) for k in range(n))
        weights.append(h)
    return torch.stack(weights)

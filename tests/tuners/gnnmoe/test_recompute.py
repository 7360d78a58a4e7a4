"""The dense and blocked expert orders keep only their inputs for the backward pass (recompute.py); their values and
gradients against the reference are pinned in test_expert_equivalence.py."""

import pytest
import torch

from peft_gnnmoe.tuners.gnnmoe.kronecker import (
    init_kron_experts,
    kron_moe_forward_blocked,
    kron_moe_forward_dense,
    kron_path,
)

ORDERS = {
    "dense": (kron_moe_forward_dense, (64, 64, 4, 4, 4)),
    "blocked": (kron_moe_forward_blocked, (384, 96, 4, 4, 4)),
}


def _saved_numel(forward, experts, tokens: int, width: int) -> int:
    """Numbers autograd keeps for the backward pass of one call on ``tokens`` tokens (each storage counted once)."""
    x = torch.randn(tokens, width, requires_grad=True)
    gates = torch.rand(tokens, experts["left"].shape[0], requires_grad=True)
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes() // t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = forward(x, gates, **experts)
    y.sum().backward()
    return sum(storages.values())


@pytest.mark.parametrize("order", ORDERS)
def test_what_the_backward_pass_keeps_grows_with_the_tokens_by_their_input_and_gates_only(order):
    forward, (in_f, out_f, num_experts, n, r) = ORDERS[order]
    assert kron_path(in_f, out_f, num_experts, n, r) == order
    experts = {k: v.requires_grad_() for k, v in init_kron_experts(in_f, out_f, num_experts, n, r, False).items()}
    growth = _saved_numel(forward, experts, 200, in_f) - _saved_numel(forward, experts, 100, in_f)
    # 100 more tokens: their inputs and gates; autograd alone would also keep the order's intermediates
    # (the gated tokens, E in per token; the blocked order's three E n r n per token)
    assert growth == 100 * (in_f + num_experts)


@pytest.mark.parametrize("order", ORDERS)
def test_bf16_autocast_recomputes_in_the_forward_pass_precision(order):
    forward, (in_f, out_f, num_experts, n, r) = ORDERS[order]
    torch.manual_seed(0)
    experts = init_kron_experts(in_f, out_f, num_experts, n, r, zero_right=False)
    x, gates = torch.randn(50, in_f), torch.rand(50, num_experts)
    grads = {}
    for autocast in (False, True):
        leaves = [t.clone().requires_grad_() for t in (x, gates, *experts.values())]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = forward(*leaves)
        assert y.dtype == (torch.bfloat16 if autocast else torch.float32)
        y.float().pow(2).sum().backward()
        grads[autocast] = [t.grad for t in leaves]
    for exact, mixed in zip(grads[False], grads[True]):
        assert mixed.dtype == torch.float32  # the parameters' and inputs' own dtype
        torch.testing.assert_close(mixed, exact, rtol=0.05, atol=0.05 * exact.abs().max().item())

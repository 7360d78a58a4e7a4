import pytest
import torch

from peft_gnnmoe.tuners.gnnmoe.kronecker import (
    init_kron_experts,
    kron_expert_weights,
    kron_moe_forward,
    kron_path,
    kron_shapes,
)


def _experts(in_f, out_f, num_experts, n, r, seed=0):
    torch.manual_seed(seed)
    t = init_kron_experts(in_f, out_f, num_experts, n, r, zero_right=False)
    t["bias"].normal_()
    return {k: v.double().requires_grad_() for k, v in t.items()}


@pytest.mark.parametrize(
    "in_f,out_f,num_experts,n,r",
    [(8, 8, 1, 2, 1), (8, 12, 3, 2, 2), (16, 48, 2, 8, 3), (48, 16, 4, 4, 4), (64, 256, 4, 4, 4), (30, 20, 2, 5, 2)],
)
def test_factored_equals_explicit_kron(in_f, out_f, num_experts, n, r):
    """The factored path equals sum_e g_e (x H_e + b_e) with H_e built explicitly by torch.kron, values and grads."""
    t = _experts(in_f, out_f, num_experts, n, r)
    x = torch.randn(3, 5, in_f, dtype=torch.float64, requires_grad=True)
    gates = torch.rand(3, 5, num_experts, dtype=torch.float64)
    y = kron_moe_forward(x, gates, t["rules"], t["left"], t["right"], t["bias"])

    weights = kron_expert_weights(t["rules"], t["left"], t["right"])  # E, in, out via torch.kron
    assert weights.shape == (num_experts, in_f, out_f)
    ref = torch.einsum("bsi,eio,bse->bso", x, weights, gates) + gates @ t["bias"]
    torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-10)

    upstream = torch.randn_like(y)
    grads = torch.autograd.grad((y * upstream).sum(), [x, *t.values()])
    ref_grads = torch.autograd.grad((ref * upstream).sum(), [x, *t.values()])
    for g, rg in zip(grads, ref_grads):
        torch.testing.assert_close(g, rg, rtol=1e-9, atol=1e-9)


def test_kron_convention_matches_torch_kron_on_one_term():
    """A single rule/factor pair: x (A ⊗ B) must equal x @ torch.kron(A, B) (row-major reshape convention)."""
    torch.manual_seed(0)
    n, p, q = 3, 4, 5
    rules = torch.zeros(n, n, n, dtype=torch.float64)
    rules[0] = torch.randn(n, n, dtype=torch.float64)
    left = torch.zeros(1, n, p, p, dtype=torch.float64)
    left[0, 0] = torch.eye(p, dtype=torch.float64)
    right = torch.zeros(1, n, p, q, dtype=torch.float64)
    right[0, 0] = torch.randn(p, q, dtype=torch.float64)
    x = torch.randn(7, n * p, dtype=torch.float64)
    y = kron_moe_forward(
        x, torch.ones(7, 1, dtype=torch.float64), rules, left, right, torch.zeros(1, n * q, dtype=torch.float64)
    )
    torch.testing.assert_close(y, x @ torch.kron(rules[0], right[0, 0]))


def test_forward_and_backward_never_build_the_dense_weight(monkeypatch):
    """On a layer that takes a factored order (not the dense one of the narrowest layers)."""
    assert kron_path(32, 64, 4, 4, 2) == "folded"
    t = _experts(32, 64, 4, 4, 2)

    def forbidden(*args, **kwargs):
        raise AssertionError("torch.kron must not be called on the factored path")

    monkeypatch.setattr(torch, "kron", forbidden)
    saved_sizes = []

    def pack(tensor):
        saved_sizes.append(tensor.numel())
        return tensor

    x = torch.randn(2, 9, 32, dtype=torch.float64)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        y = kron_moe_forward(x, torch.rand(2, 9, 4, dtype=torch.float64), t["rules"], t["left"], t["right"], t["bias"])
    y.sum().backward()
    assert saved_sizes  # the hook saw the tensors autograd keeps for backward
    assert 4 * 32 * 64 not in saved_sizes  # E * in * out: all dense expert weights
    assert 32 * 64 not in saved_sizes  # in * out: one dense expert weight
    assert t["left"].grad is not None
    assert t["rules"].grad is not None


def test_zero_right_factor_gives_zero_update():
    t = init_kron_experts(16, 24, 3, 4, 2, zero_right=True)
    y = kron_moe_forward(torch.randn(4, 16), torch.rand(4, 3), **t)
    assert torch.count_nonzero(y) == 0


def test_unselected_experts_do_not_contribute():
    t = _experts(16, 16, 3, 4, 2)
    x = torch.randn(5, 16, dtype=torch.float64)
    only_first = torch.tensor([[1.0, 0.0, 0.0]], dtype=torch.float64).expand(5, 3)
    y = kron_moe_forward(x, only_first, t["rules"], t["left"], t["right"], t["bias"])
    w = kron_expert_weights(t["rules"], t["left"], t["right"])
    torch.testing.assert_close(y, x @ w[0] + t["bias"][0])


def test_factor_that_cannot_tile_is_rejected_with_alternatives():
    with pytest.raises(ValueError, match=r"kron_factor=5 cannot tile a 32 -> 48 layer.*\[1, 2, 4, 8, 16\]"):
        kron_shapes(32, 48, 5)

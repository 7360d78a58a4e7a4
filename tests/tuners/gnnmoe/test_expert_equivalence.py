"""The optimised Kronecker-expert contractions against a straightforward reference, values and every gradient."""

import pytest
import torch

from peft_gnnmoe.tuners.gnnmoe import kronecker
from peft_gnnmoe.tuners.gnnmoe.kronecker import (
    init_kron_experts,
    kron_expert_weights,
    kron_moe_forward,
    kron_moe_forward_blocked,
    kron_moe_forward_dense,
    kron_moe_forward_folded,
    kron_path,
)

PATHS = {
    "dispatch": kron_moe_forward,
    "dense": kron_moe_forward_dense,
    "folded": kron_moe_forward_folded,
    "blocked": kron_moe_forward_blocked,
}
# in, out, E, n, r: square and non-square, n = 1, one expert, rank 1, wide enough to take the blocked path
SHAPES = [
    (8, 8, 1, 2, 1),
    (8, 12, 3, 2, 2),
    (12, 8, 2, 1, 3),
    (48, 16, 4, 4, 4),
    (30, 20, 2, 5, 2),
    (384, 96, 4, 4, 4),
]


def _reference(x, gates, rules, left, right, bias):
    """Token by token, expert by expert, rule by rule: y_e = vec(sum_k S_kᵀ X L_ek R_ek) + b_e, mixed by the gates."""
    num_experts, n, p, _ = left.shape
    blocks = x.reshape(-1, n, p)
    g = gates.reshape(-1, num_experts)
    out = []
    for t in range(blocks.shape[0]):
        y = 0
        for e in range(num_experts):
            h = sum(rules[k].T @ blocks[t] @ left[e, k] @ right[e, k] for k in range(n))
            y = y + g[t, e] * (h.reshape(-1) + bias[e])
        out.append(y)
    return torch.stack(out).reshape(*x.shape[:-1], -1)


def _inputs(in_f, out_f, num_experts, n, r, seed=0):
    torch.manual_seed(seed)
    t = init_kron_experts(in_f, out_f, num_experts, n, r, zero_right=False)
    t["bias"].normal_()
    params = {k: v.double().requires_grad_() for k, v in t.items()}
    x = torch.randn(2, 3, in_f, dtype=torch.float64, requires_grad=True)
    gates = torch.rand(2, 3, num_experts, dtype=torch.float64)
    gates[..., 0] = 0.0  # an unselected expert
    return x, gates.requires_grad_(), params


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_values_match_reference(path, shape):
    x, gates, t = _inputs(*shape)
    y = PATHS[path](x, gates, t["rules"], t["left"], t["right"], t["bias"])
    torch.testing.assert_close(y, _reference(x, gates, **t), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("wrt", ["x", "gates", "rules", "left", "right", "bias"])
def test_gradients_match_reference(path, shape, wrt):
    x, gates, t = _inputs(*shape)
    inputs = {"x": x, "gates": gates, **t}
    upstream = torch.randn(2, 3, shape[1], dtype=torch.float64)
    y = PATHS[path](x, gates, t["rules"], t["left"], t["right"], t["bias"])
    (grad,) = torch.autograd.grad((y * upstream).sum(), inputs[wrt])
    (ref,) = torch.autograd.grad((_reference(x, gates, **t) * upstream).sum(), inputs[wrt])
    torch.testing.assert_close(grad, ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("path", ["dense", "folded", "blocked"])
def test_path_matches_dense_torch_kron_weights(path):
    x, gates, t = _inputs(24, 40, 3, 4, 2)
    y = PATHS[path](x, gates, t["rules"], t["left"], t["right"], None)
    dense = kron_expert_weights(t["rules"], t["left"], t["right"])
    torch.testing.assert_close(y, torch.einsum("bsi,eio,bse->bso", x, dense, gates), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("path", ["dense", "folded", "blocked"])
def test_path_without_bias_is_the_biased_result_minus_the_gated_bias(path):
    x, gates, t = _inputs(16, 24, 2, 4, 2)
    with_bias = PATHS[path](x, gates, t["rules"], t["left"], t["right"], t["bias"])
    without = PATHS[path](x, gates, t["rules"], t["left"], t["right"], None)
    torch.testing.assert_close(without, with_bias - gates @ t["bias"], rtol=1e-12, atol=1e-12)


def test_dispatch_takes_the_dense_order_on_64_wide_layers_only(monkeypatch):
    """The tiny backbone's 64-wide layers take the dense order, 128-wide ones the folded order, ViT-B's 768-wide ones
    the blocked order (default E=4, n=4, r=4)."""
    taken = []
    monkeypatch.setattr(kronecker, "kron_moe_forward_dense", lambda *a: taken.append("dense"))
    monkeypatch.setattr(kronecker, "kron_moe_forward_folded", lambda *a: taken.append("folded"))
    monkeypatch.setattr(kronecker, "kron_moe_forward_blocked", lambda *a: taken.append("blocked"))
    for width in (64, 128, 768):
        x, gates, t = _inputs(width, width, 4, 4, 4)
        kronecker.kron_moe_forward(x, gates, t["rules"], t["left"], t["right"], t["bias"])
    assert taken == ["dense", "folded", "blocked"]


@pytest.mark.parametrize(
    "shape,path",
    [((64, 64, 4, 4, 4), "dense"), ((128, 128, 4, 4, 4), "folded"), ((384, 384, 4, 4, 4), "blocked"),
     ((768, 768, 4, 4, 1), "folded"), ((64, 128, 4, 4, 4), "folded")],
)  # fmt: skip
def test_kron_path_names_the_order_dispatch_takes(shape, path):
    assert kron_path(*shape) == path


@pytest.mark.parametrize("path", ["dense", "folded", "blocked"])
def test_float32_input_with_float32_experts_stays_float32(path):
    t = init_kron_experts(32, 48, 4, 4, 2, zero_right=False)
    y = PATHS[path](torch.randn(5, 32), torch.rand(5, 4), **t)
    assert y.dtype == torch.float32

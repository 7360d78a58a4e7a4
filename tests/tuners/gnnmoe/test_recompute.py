"""GNNMoEConfig.recompute_intermediates: the dense and blocked expert orders keep only their inputs for the backward
pass (recompute.py) and the router recomputes its layers (activation checkpointing), with the results of keeping
everything. The orders' values and gradients against the reference are pinned in test_expert_equivalence.py."""

import pytest
import torch
from peft import get_peft_model

from peft_gnnmoe import GNNMoEConfig
from peft_gnnmoe.tuners.gnnmoe.kronecker import (
    init_kron_experts,
    kron_moe_forward_blocked,
    kron_moe_forward_dense,
    kron_path,
)
from peft_gnnmoe.tuners.gnnmoe.sparse import kron_moe_forward_sparse

ORDERS = {
    "dense": (kron_moe_forward_dense, (64, 64, 4, 4, 4)),
    "blocked": (kron_moe_forward_blocked, (384, 96, 4, 4, 4)),
}


def _saved_numel(forward, experts, tokens: int, width: int, recompute: bool | None = None) -> int:
    """Numbers autograd keeps for the backward pass of one call on ``tokens`` tokens (each storage counted once)."""
    x = torch.randn(tokens, width, requires_grad=True)
    gates = torch.rand(tokens, experts["left"].shape[0], requires_grad=True)
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes() // t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = forward(x, gates, **experts, **({} if recompute is None else {"recompute": recompute}))
    y.sum().backward()
    return sum(storages.values())


@pytest.mark.parametrize("order", ORDERS)
def test_what_the_backward_pass_keeps_grows_with_the_tokens_by_their_input_and_gates_only(order):
    forward, (in_f, out_f, num_experts, n, r) = ORDERS[order]
    assert kron_path(in_f, out_f, num_experts, n, r) == order
    experts = {k: v.requires_grad_() for k, v in init_kron_experts(in_f, out_f, num_experts, n, r, False).items()}
    growth = _saved_numel(forward, experts, 200, in_f) - _saved_numel(forward, experts, 100, in_f)
    assert growth == 100 * (in_f + num_experts)  # 100 more tokens: their inputs and gates
    if order == "blocked":  # recompute=False also keeps its three intermediates of E n r n numbers per token
        kept = _saved_numel(forward, experts, 200, in_f, False) - _saved_numel(forward, experts, 100, in_f, False)
        assert kept == 100 * (in_f + num_experts + 3 * num_experts * n * r * n)


def test_keeping_the_blocked_orders_intermediates_gives_the_same_values_and_gradients():
    forward, (in_f, out_f, num_experts, n, r) = ORDERS["blocked"]
    torch.manual_seed(0)
    experts = init_kron_experts(in_f, out_f, num_experts, n, r, zero_right=False)
    x, gates = torch.randn(30, in_f, dtype=torch.float64), torch.rand(30, num_experts, dtype=torch.float64)
    upstream = torch.randn(30, out_f, dtype=torch.float64)
    results = []
    for recompute in (True, False):
        leaves = [t.double().requires_grad_() for t in (x, gates, *experts.values())]
        y = forward(*leaves, recompute=recompute)
        results.append([y, *torch.autograd.grad((y * upstream).sum(), leaves)])
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def _sparse_top_2(x, gates, *experts, **kwargs):
    return kron_moe_forward_sparse(x, gates, gates.topk(2, dim=-1).indices, *experts, **kwargs)


@pytest.mark.parametrize("order", [*ORDERS, "sparse"])
def test_bf16_autocast_recomputes_in_the_forward_pass_precision(order):
    forward, (in_f, out_f, num_experts, n, r) = ORDERS.get(order, (_sparse_top_2, (384, 96, 16, 4, 4)))
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


@pytest.mark.parametrize("router", ["gcn", "gat", "sage"])
def test_a_model_gives_the_same_loss_and_gradients_and_keeps_less_for_backward(make_vit, images, labels, router):
    results = []
    for recompute in (True, False):
        config = GNNMoEConfig(
            router=router, init_weights=False, router_noise_std=0.0, recompute_intermediates=recompute
        )
        model = get_peft_model(make_vit().double(), config).train()
        storages = {}

        def pack(t, storages=storages):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(pixel_values=images.double(), labels=labels).loss
        params = [p for p in model.parameters() if p.requires_grad]
        results.append((loss, torch.autograd.grad(loss, params), sum(storages.values())))
    (loss, grads, kept_recomputing), (want_loss, want_grads, kept_all) = results
    torch.testing.assert_close(loss, want_loss, rtol=1e-12, atol=1e-12)
    for got, want in zip(grads, want_grads):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    assert kept_recomputing < 0.9 * kept_all  # the router's activations (the tiny ViT's experts always recompute)


def test_the_sparse_order_keeps_its_input_and_indices_not_k_copies_of_every_token():
    torch.manual_seed(0)
    experts = init_kron_experts(384, 96, 16, 4, 4, zero_right=False)
    x = torch.randn(300, 384)
    logits = torch.randn(300, 16)
    index = logits.topk(2, dim=-1).indices
    gates = torch.zeros_like(logits).scatter(-1, index, 0.5)
    kept = {}
    for recompute in (True, False):
        storages = {}

        def pack(t, storages=storages):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        leaves = [t.clone().requires_grad_() for t in (x, gates, *experts.values())]
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = kron_moe_forward_sparse(leaves[0], leaves[1], index, *leaves[2:], recompute=recompute)
        y.sum().backward()
        kept[recompute] = sum(storages.values())
    assert kept[True] < 1.5 * x.nbytes  # the input and a few (T k) index and gate vectors
    assert kept[False] > 4 * x.nbytes  # two rows per token: their inputs, intermediates and outputs

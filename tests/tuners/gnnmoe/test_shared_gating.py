"""Layers that share a router and an input (q / k / v) share one routing (and, in the sparse expert order, the
tokens grouped by expert), and each still gives its own straightforward result ``base(x) + sum_e g_e (x H_e + b_e)``
(float64)."""

import pytest
import torch
from peft import get_peft_model

from peft_gnnmoe import GNNMoEConfig
from peft_gnnmoe.tuners.gnnmoe import layer as layer_module
from peft_gnnmoe.tuners.gnnmoe.kronecker import kron_expert_weights, kron_path
from peft_gnnmoe.tuners.gnnmoe.router import GraphRouter


def _model(make_vit, dispatch="auto"):
    config = GNNMoEConfig(init_weights=False, router_noise_std=0.0, expert_dispatch=dispatch)
    model = get_peft_model(make_vit().double(), config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "gnnmoe_bias" in name:
                param.normal_()
    return model


def test_the_tiny_vit_takes_the_dense_order():
    assert kron_path(32, 32, 4, 4, 4) == "dense"  # make_vit's 32-wide q/k/v with the default experts


def test_q_k_v_group_the_tokens_by_expert_once_per_block(make_vit, images, monkeypatch):
    model = _model(make_vit, "sparse")
    calls = []
    original = layer_module.dispatch_tokens
    monkeypatch.setattr(layer_module, "dispatch_tokens", lambda *args: calls.append(1) or original(*args))
    model.train()
    model(pixel_values=images.double())
    assert len(calls) == 2  # two blocks, one shared router each


@pytest.mark.parametrize("dispatch", ["dense", "sparse"])
def test_each_of_q_k_v_equals_the_straightforward_mixture(make_vit, images, dispatch):
    model = _model(make_vit, dispatch)
    attention = model.base_model.model.vit.layers[0].attention
    seen = {}
    for name in ("q_proj", "k_proj", "v_proj"):
        module = getattr(attention, name)
        module.register_forward_hook(lambda m, args, out, name=name: seen.__setitem__(name, (args[0], out)))
    model.train()
    model(pixel_values=images.double())
    gates = attention.q_proj.gnnmoe_router["default"].routings[0].gates
    for name in ("q_proj", "k_proj", "v_proj"):
        module = getattr(attention, name)
        x, out = seen[name]
        weights = kron_expert_weights(
            module.gnnmoe_rules["default"], module.gnnmoe_left["default"], module.gnnmoe_right["default"]
        )
        want = module.base_layer(x) + torch.einsum("bsi,eio,bse->bso", x, weights, gates)
        want = want + gates @ module.gnnmoe_bias["default"]
        torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)


def test_shared_grouped_tokens_give_the_gradients_of_separate_ones(make_vit, images, labels, monkeypatch):
    model = _model(make_vit, "sparse")
    model.train()
    model(pixel_values=images.double(), labels=labels).loss.backward()
    shared = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    monkeypatch.setattr(GraphRouter, "shared", lambda self, routing, tokens, build: build())  # nothing shared
    model(pixel_values=images.double(), labels=labels).loss.backward()
    assert shared
    for name, param in model.named_parameters():
        if name in shared:
            torch.testing.assert_close(param.grad, shared[name], rtol=1e-10, atol=1e-12)

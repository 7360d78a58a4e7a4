"""The sparse top-k order (each expert on its own tokens) gives the dense orders' outputs and gradients (float64):
as a function, for top_k from 1 to E and experts without tokens, and in a model, for every router, graph mode and
padded batches."""

import pytest
import torch
from peft import get_peft_model
from transformers import BertConfig, BertModel

from peft_gnnmoe import GNNMoEConfig
from peft_gnnmoe.tuners.gnnmoe.config import GRAPH_MODES, ROUTER_TYPES
from peft_gnnmoe.tuners.gnnmoe.kronecker import init_kron_experts, kron_expert_weights, kron_path
from peft_gnnmoe.tuners.gnnmoe.layer import GNNMoELayer
from peft_gnnmoe.tuners.gnnmoe.sparse import dispatch_tokens, kron_moe_forward_sparse

# ---- the function --------------------------------------------------------------------------------------------------


def _experts(in_f, out_f, num_experts, n, r, seed=0):
    torch.manual_seed(seed)
    t = init_kron_experts(in_f, out_f, num_experts, n, r, zero_right=False)
    t["bias"].normal_()
    return {k: v.double().requires_grad_() for k, v in t.items()}


def _routing(logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k gates as the router makes them: renormalised weights scattered into zeros."""
    weights, index = logits.softmax(-1).topk(top_k, dim=-1)
    weights = weights / weights.sum(-1, keepdim=True)
    return torch.zeros_like(logits).scatter(-1, index, weights), index


def _dense_reference(x, gates, rules, left, right, bias):
    """Every expert's dense weight (torch.kron) on every token, mixed by the gates."""
    weights = kron_expert_weights(rules, left, right)
    return torch.einsum("...i,eio,...e->...o", x, weights, gates) + gates @ bias


@pytest.mark.parametrize("recompute", [True, False])
@pytest.mark.parametrize("shape", [(8, 12, 3, 2, 2), (48, 16, 4, 4, 4), (30, 20, 5, 5, 1), (64, 64, 6, 4, 4)])
def test_every_top_k_gives_the_dense_values_and_gradients(shape, recompute):
    in_f, out_f, num_experts, n, r = shape
    for top_k in range(1, num_experts + 1):
        t = _experts(*shape)
        x = torch.randn(2, 5, in_f, dtype=torch.float64, requires_grad=True)
        logits = torch.randn(2, 5, num_experts, dtype=torch.float64, requires_grad=True)
        gates, index = _routing(logits, top_k)
        upstream = torch.randn(2, 5, out_f, dtype=torch.float64)
        inputs = [x, logits, *t.values()]
        got = kron_moe_forward_sparse(x, gates, index, *t.values(), recompute=recompute)
        want = _dense_reference(x, gates, **t)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
        got_grads = torch.autograd.grad((got * upstream).sum(), inputs, retain_graph=True)
        want_grads = torch.autograd.grad((want * upstream).sum(), inputs)
        for g, w in zip(got_grads, want_grads):
            torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10)


def test_an_expert_without_tokens_gets_a_zero_gradient_not_none():
    t = _experts(16, 24, 5, 4, 2)
    x = torch.randn(7, 16, dtype=torch.float64)
    logits = torch.randn(7, 5, dtype=torch.float64)
    logits[:, 3] = -1e4  # expert 3 is nobody's choice
    gates, index = _routing(logits, 2)
    assert not (index == 3).any()
    y = kron_moe_forward_sparse(x, gates, index, t["rules"], t["left"], t["right"], t["bias"])
    grads = dict(zip(t, torch.autograd.grad(y.square().sum(), list(t.values()))))
    for name in ("left", "right", "bias"):
        assert grads[name][3].abs().max() == 0
        assert grads[name].abs().max() > 0
    torch.testing.assert_close(y, _dense_reference(x, gates, **t), rtol=1e-10, atol=1e-10)


def test_no_tokens_give_an_empty_output():
    t = _experts(16, 24, 4, 4, 2)
    index = torch.zeros(0, 2, dtype=torch.long)
    y = kron_moe_forward_sparse(
        torch.zeros(0, 16, dtype=torch.float64), torch.zeros(0, 4, dtype=torch.float64), index, **t
    )
    assert y.shape == (0, 24)


def test_dispatch_sorts_the_assignments_by_expert():
    index = torch.tensor([[0, 2], [2, 0], [2, 1], [0, 2]])  # expert 0: tokens 0, 1, 3; 1: 2; 2: all four; 3: none
    dispatch = dispatch_tokens(index, num_experts=4)
    assert dispatch.counts == [3, 1, 4, 0]
    assert dispatch.token.tolist() == [0, 1, 3, 2, 0, 1, 2, 3]
    assert dispatch.assignment.tolist() == [0, 3, 6, 5, 1, 2, 4, 7]  # token * k + choice
    assert dispatch.expert.tolist() == [0, 0, 0, 1, 2, 2, 2, 2]


def test_kron_path_takes_the_sparse_order_from_8_experts_per_choice():
    assert [kron_path(384, 384, e, 4, 4, top_k=2) for e in (4, 8, 16, 32)] == ["blocked"] * 2 + ["sparse"] * 2
    assert kron_path(384, 384, 32, 4, 4) == "blocked"  # without top_k: the dense orders only
    assert [kron_path(64, 64, e, 4, 4, top_k=1) for e in (4, 8)] == ["dense", "sparse"]  # top-1: from 8
    assert kron_path(64, 64, 4, 4, 4, top_k=2) == "dense"  # the default config keeps its order


# ---- in a model ----------------------------------------------------------------------------------------------------


def _set_dispatch(model, setting: str) -> None:
    for module in model.modules():
        if isinstance(module, GNNMoELayer):
            module.gnnmoe_dispatch["default"] = setting


def _outputs_and_grads(model, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad()
    out = model(**batch)
    result = out.logits if hasattr(out, "logits") else out.last_hidden_state
    (result.square().sum() + model.base_model.aux_loss()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return result.detach(), grads


def _assert_sparse_matches_dense(model, batch: dict) -> None:
    model.train()
    _set_dispatch(model, "dense")
    dense = _outputs_and_grads(model, batch)
    _set_dispatch(model, "sparse")
    sparse = _outputs_and_grads(model, batch)
    torch.testing.assert_close(sparse[0], dense[0], rtol=1e-10, atol=1e-10)
    assert sparse[1].keys() == dense[1].keys() and all(g is not None for g in sparse[1].values())
    for name, grad in dense[1].items():
        torch.testing.assert_close(sparse[1][name], grad, rtol=1e-9, atol=1e-10, msg=name)


def _vit_config(**overrides) -> GNNMoEConfig:
    return GNNMoEConfig(**{"init_weights": False, "router_noise_std": 0.0, **overrides})


ROUTER_GRAPHS = [(router, graph) for router in ROUTER_TYPES for graph in GRAPH_MODES] + [("linear", "knn")]


@pytest.mark.parametrize("router,graph", ROUTER_GRAPHS, ids=lambda v: v)
def test_every_router_and_graph_mode_give_the_dense_model(make_vit, images, labels, router, graph):
    model = get_peft_model(make_vit().double(), _vit_config(router=router, graph=graph, num_experts=6, top_k=2))
    _assert_sparse_matches_dense(model, {"pixel_values": images.double(), "labels": labels})


@pytest.mark.parametrize("top_k", [1, 3, 8])
def test_top_k_up_to_every_expert_gives_the_dense_model(make_vit, images, labels, top_k):
    model = get_peft_model(make_vit().double(), _vit_config(num_experts=8, top_k=top_k))
    _assert_sparse_matches_dense(model, {"pixel_values": images.double(), "labels": labels})


def test_experts_without_tokens_in_a_model(make_vit, images, labels):
    """64 experts, one per token, 34 tokens per layer: most experts get none, and a zero gradient (DDP needs one)."""
    model = get_peft_model(make_vit().double(), _vit_config(num_experts=64, top_k=1))
    _assert_sparse_matches_dense(model, {"pixel_values": images.double(), "labels": labels})
    loads = [r.load for router in model.base_model.active_routers().values() for r in router.routings]
    assert loads and all(bool((load == 0).any()) for load in loads)


def test_a_padded_text_batch_gives_the_dense_model():
    torch.manual_seed(0)
    bert = BertModel(
        BertConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=50,
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        )
    ).double()  # fmt: skip
    config = _vit_config(target_modules=["query", "key", "value"], graph="knn", num_experts=6)
    model = get_peft_model(bert, config)
    ids = torch.randint(1, 50, (2, 9), generator=torch.Generator().manual_seed(5))
    mask = (torch.arange(9) < torch.tensor([[9], [4]])).long()
    _assert_sparse_matches_dense(model, {"input_ids": ids.masked_fill(mask == 0, 0), "attention_mask": mask})


def test_the_setting_is_saved_with_the_adapter(make_vit, tmp_path):
    from peft import PeftModel

    get_peft_model(make_vit(), _vit_config(expert_dispatch="sparse")).save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(make_vit(), tmp_path)
    assert loaded.peft_config["default"].expert_dispatch == "sparse"
    layers = [m for m in loaded.modules() if isinstance(m, GNNMoELayer)]
    assert layers and all(m.gnnmoe_dispatch["default"] == "sparse" for m in layers)


def test_an_unknown_setting_is_refused():
    with pytest.raises(ValueError, match="expert_dispatch"):
        GNNMoEConfig(expert_dispatch="grouped")


def test_inference_mode_and_a_copy_give_the_dense_model(make_vit, images):
    """Evaluation as users run it: ``torch.inference_mode()`` (GAT's own attention function too) and a deep copy."""
    import copy

    model = get_peft_model(make_vit().double(), _vit_config(router="gat", num_experts=16, top_k=2)).eval()
    pixels = images.double()
    _set_dispatch(model, "dense")
    with torch.no_grad():
        dense = model(pixel_values=pixels).logits
    _set_dispatch(model, "sparse")
    with torch.inference_mode():
        sparse = model(pixel_values=pixels).logits
    torch.testing.assert_close(sparse, dense, rtol=1e-10, atol=1e-10)
    with torch.inference_mode():
        copied = copy.deepcopy(model)(pixel_values=pixels).logits
    torch.testing.assert_close(copied, dense, rtol=1e-10, atol=1e-10)

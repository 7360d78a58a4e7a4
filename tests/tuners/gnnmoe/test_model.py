import copy

import pytest
import torch
from peft import get_peft_model
from torch import nn

import peft_gnnmoe
from peft_gnnmoe import GNNMoEConfig, get_aux_loss, get_expert_assignments, get_routing_stats
from peft_gnnmoe.tuners.gnnmoe import GNNMoELayer


def _output(out):
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize("router", ["gcn", "gat", "sage"])
@pytest.mark.parametrize("graph", ["knn", "grid", "knn+grid"])
def test_each_router_and_graph_starts_equal_to_base_and_trains(router, graph, images, labels, make_vit):
    base = make_vit()
    with torch.no_grad():
        base_logits = base(pixel_values=images).logits
    model = get_peft_model(base, GNNMoEConfig(router=router, graph=graph, modules_to_save=["classifier"]))
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(pixel_values=images).logits, base_logits)

    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(trainable, lr=1e-2)
    first = None
    for _ in range(5):
        out = model(pixel_values=images, labels=labels)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        first = out.loss.item() if first is None else first
    assert out.loss.item() < first
    router_params = [p for n, p in model.named_parameters() if "gnnmoe_router" in n]
    assert router_params
    assert all(p.grad is not None for p in router_params)
    assert all(p.grad.abs().sum() > 0 for p in router_params)
    model.eval()
    with torch.no_grad():
        assert not torch.allclose(model(pixel_values=images).logits, base_logits)


def test_vit_family_architectures(vit_family, images, make_vit_family):
    name, prefix = vit_family
    base = make_vit_family(name)
    with torch.no_grad():
        reference = _output(base(pixel_values=images))
    model = get_peft_model(base, GNNMoEConfig(init_weights=False))
    adapted = [n for n, m in model.named_modules() if isinstance(m, GNNMoELayer)]
    assert len(adapted) == 2 * 3
    assert {n.rsplit(".", 1)[-1] for n in adapted} == {"q_proj", "k_proj", "v_proj"}
    model.train()
    out = _output(model(pixel_values=images))
    assert not torch.allclose(out, reference)
    out.float().pow(2).mean().backward()
    assignments = get_expert_assignments(model)
    assert len(assignments) == 2  # one shared router per attention block
    for info in assignments.values():
        assert info["num_prefix_tokens"] == prefix
        assert info["grid"] == (4, 4)
        assert info["topk_index"].shape == (2, prefix + 16, 2)


def test_clip_full_model_defaults_adapt_only_the_vision_tower():
    from transformers import CLIPConfig, CLIPModel

    config = CLIPConfig(
        text_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64),
        vision_config=dict(
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
            image_size=32,
            patch_size=8,
        ),
        projection_dim=16,
    )
    model = get_peft_model(CLIPModel(config), GNNMoEConfig())
    adapted = [n for n, m in model.named_modules() if isinstance(m, GNNMoELayer)]
    assert len(adapted) == 3
    assert all("vision_model" in n for n in adapted), adapted


def test_qkv_share_one_router_and_one_routing_decision(images, make_vit):
    model = get_peft_model(make_vit(), GNNMoEConfig())
    attn = model.base_model.model.vit.layers[0].attention
    router = attn.q_proj.gnnmoe_router_ref["default"]
    assert attn.k_proj.gnnmoe_router_ref["default"] is router
    assert attn.v_proj.gnnmoe_router_ref["default"] is router
    assert attn.q_proj.owns_router("default")
    assert not attn.k_proj.owns_router("default")
    calls = []
    router.register_forward_hook(lambda *a: calls.append(1))
    routings = []
    original_route = router._route
    router._route = lambda *args: routings.append(1) or original_route(*args)
    model(pixel_values=images)
    assert len(calls) == 3  # q, k and v each ask the router
    assert len(routings) == 1  # ... and get one routing decision per forward
    separate = get_peft_model(make_vit(), GNNMoEConfig(shared_router_groups=[]))
    assert len(get_routing_stats(separate) or {}) == 0  # nothing ran yet
    separate(pixel_values=images)
    assert len(get_routing_stats(separate)) == 6
    n_shared = sum(p.numel() for n, p in model.named_parameters() if "gnnmoe_router" in n)
    n_separate = sum(p.numel() for n, p in separate.named_parameters() if "gnnmoe_router" in n)
    assert n_separate == 3 * n_shared


def test_aux_loss_is_added_to_output_loss_and_retrievable(images, labels, make_vit):
    model = get_peft_model(make_vit(), GNNMoEConfig(modules_to_save=["classifier"]))
    model.train()
    out = model(pixel_values=images, labels=labels)
    aux = get_aux_loss(model)
    ce = nn.functional.cross_entropy(out.logits, labels)
    assert aux is not None
    assert aux.item() > 0
    torch.testing.assert_close(out.loss, ce + aux)
    # a balanced router has balance loss near 1 (its minimum); z-loss is non-negative
    for stats in get_routing_stats(model).values():
        assert abs(sum(stats["load"]) - 1.0) < 1e-5
        assert stats["balance_loss"] >= 1.0 - 1e-5
        assert stats["z_loss"] >= 0

    off = get_peft_model(make_vit(), GNNMoEConfig(add_aux_loss_to_output=False, modules_to_save=["classifier"]))
    out = off(pixel_values=images, labels=labels)
    torch.testing.assert_close(out.loss, nn.functional.cross_entropy(out.logits, labels))
    assert get_aux_loss(off) is not None


def test_switch_balance_loss_and_weights(images, make_vit):
    model = get_peft_model(make_vit(), GNNMoEConfig(balance_loss="switch", balance_loss_weight=0.5, z_loss_weight=0.0))
    model(pixel_values=images)
    stats = get_routing_stats(model)
    expected = sum(0.5 * s["balance_loss"] for s in stats.values())
    assert abs(get_aux_loss(model).item() - expected) < 1e-5


def test_eval_is_deterministic_and_training_noise_is_used(images, make_vit):
    model = get_peft_model(make_vit(), GNNMoEConfig(init_weights=False, router_noise_std=5.0))
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(pixel_values=images).logits, model(pixel_values=images).logits)
    model.train()
    with torch.no_grad():
        first = model(pixel_values=images).logits
        second = model(pixel_values=images).logits
    assert not torch.allclose(first, second)


def test_dense_routing_when_top_k_equals_num_experts(images, make_vit):
    model = get_peft_model(make_vit(), GNNMoEConfig(num_experts=3, top_k=3))
    model(pixel_values=images)
    for info in get_expert_assignments(model).values():
        assert sorted(info["topk_index"][0, 0].tolist()) == [0, 1, 2]


def test_multiple_adapters_set_disable_delete(images, make_vit):
    base = make_vit()
    with torch.no_grad():
        base_logits = base(pixel_values=images).logits
    model = get_peft_model(base, GNNMoEConfig(init_weights=False, router="gcn"))
    model.add_adapter("other", GNNMoEConfig(init_weights=False, router="gat", num_experts=2, top_k=1))
    model.eval()
    with torch.no_grad():
        first = model(pixel_values=images).logits
        model.set_adapter("other")
        second = model(pixel_values=images).logits
        with model.disable_adapter():
            disabled = model(pixel_values=images).logits
            assert get_aux_loss(model) is None
    assert not torch.allclose(first, second)
    torch.testing.assert_close(disabled, base_logits)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable
    assert all(".other" in n for n in trainable), trainable
    model.delete_adapter("default")
    assert all(".default" not in n for n, _ in model.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(model(pixel_values=images).logits, second)


def test_unload_restores_base_and_merge_is_refused_clearly(images, labels, make_vit):
    base = make_vit()
    with torch.no_grad():
        base_logits = base(pixel_values=images).logits
    model = get_peft_model(base, GNNMoEConfig(init_weights=False))
    with pytest.raises(ValueError, match="cannot be merged"):
        model.merge_and_unload()
    with pytest.raises(NotImplementedError, match="cannot be merged"):
        model.base_model.model.vit.layers[0].attention.q_proj.merge()
    unloaded = model.unload()
    assert not any(isinstance(m, GNNMoELayer) for m in unloaded.modules())
    with torch.no_grad():
        torch.testing.assert_close(unloaded(pixel_values=images).logits, base_logits)
    out = unloaded(pixel_values=images, labels=labels)  # the aux-loss hook is gone with the adapters
    torch.testing.assert_close(out.loss, nn.functional.cross_entropy(out.logits, labels))


@pytest.mark.parametrize("router", ["gcn", "gat"])  # GAT: its attention operator inside checkpointed blocks
def test_gradient_checkpointing_gives_same_loss_and_grads(images, labels, make_vit, router):
    def run(checkpointing):
        torch.manual_seed(0)
        config = GNNMoEConfig(router=router, init_weights=False, modules_to_save=["classifier"])
        model = get_peft_model(make_vit(), config)
        if checkpointing:
            model.gradient_checkpointing_enable()
        model.train()
        torch.manual_seed(1)
        out = model(pixel_values=images, labels=labels)
        out.loss.backward()
        return out.loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    loss, grads = run(False)
    loss_ckpt, grads_ckpt = run(True)
    torch.testing.assert_close(loss, loss_ckpt)
    assert grads.keys() == grads_ckpt.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], grads_ckpt[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_and_half_precision_model(dtype, images, labels, make_vit):
    model = get_peft_model(make_vit(), GNNMoEConfig(init_weights=False, modules_to_save=["classifier"]))
    with torch.autocast("cpu", dtype=dtype):
        out = model(pixel_values=images, labels=labels)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    if dtype is torch.float16:
        return
    bf16 = get_peft_model(make_vit().to(torch.bfloat16), GNNMoEConfig(init_weights=False))
    logits = bf16(pixel_values=images.to(torch.bfloat16)).logits
    assert logits.dtype == torch.bfloat16
    assert torch.isfinite(logits).all()


def test_two_dimensional_input_routes_each_row_on_its_own():
    class Mlp(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = nn.Linear(16, 32)
            self.fc2 = nn.Linear(32, 4)

        def forward(self, x):
            return self.fc2(torch.relu(self.fc1(x)))

    torch.manual_seed(0)
    model = get_peft_model(Mlp(), GNNMoEConfig(target_modules=["fc1"], init_weights=False, graph="knn"))
    model.eval()
    x = torch.randn(5, 16)
    with torch.no_grad():
        batched = model(x)
        one_by_one = torch.cat([model(row[None]) for row in x])
    torch.testing.assert_close(batched, one_by_one)


def test_text_model_with_knn_graph_and_clear_error_for_grid():
    from transformers import BertConfig, BertModel

    config = BertConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=50
    )
    ids = torch.randint(0, 50, (2, 7))
    model = get_peft_model(BertModel(config), GNNMoEConfig(target_modules=["query", "value"], graph="knn"))
    assert model(input_ids=ids).last_hidden_state.shape == (2, 7, 32)
    grid_model = get_peft_model(BertModel(config), GNNMoEConfig(target_modules=["query"], graph="grid"))
    with pytest.raises(ValueError, match="cannot place 7 patch tokens"):
        grid_model(input_ids=ids)


def test_every_other_block_option(make_vit):
    model = get_peft_model(
        make_vit(num_hidden_layers=4), GNNMoEConfig(layers_to_transform=[1, 3], layers_pattern="layers")
    )
    adapted = {n.split(".layers.")[1].split(".")[0] for n, m in model.named_modules() if isinstance(m, GNNMoELayer)}
    assert adapted == {"1", "3"}


def test_deepcopy_keeps_router_sharing(images, make_vit):
    model = get_peft_model(make_vit(), GNNMoEConfig(init_weights=False))
    clone = copy.deepcopy(model)
    attn = clone.base_model.model.vit.layers[0].attention
    assert attn.k_proj.gnnmoe_router_ref["default"] is attn.q_proj.gnnmoe_router["default"]
    model.eval()
    clone.eval()
    with torch.no_grad():
        torch.testing.assert_close(clone(pixel_values=images).logits, model(pixel_values=images).logits)


def test_package_exports():
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
    from peft.utils import PeftType

    from peft_gnnmoe.tuners.gnnmoe import config, model, routing_info

    assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.GNNMOE] is config.GNNMoEConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING[PeftType.GNNMOE] is model.GNNMoEModel
    assert peft_gnnmoe.GNNMoEConfig is config.GNNMoEConfig
    assert peft_gnnmoe.GNNMoEModel is model.GNNMoEModel
    assert peft_gnnmoe.get_aux_loss is routing_info.get_aux_loss
    assert peft_gnnmoe.get_routing_stats is routing_info.get_routing_stats
    assert peft_gnnmoe.get_expert_assignments is routing_info.get_expert_assignments
    assert config.GNNMoEConfig().peft_type is PeftType.GNNMOE


def test_experts_without_bias(images, labels, make_vit):
    with_bias = get_peft_model(make_vit(), GNNMoEConfig())
    without = get_peft_model(make_vit(), GNNMoEConfig(expert_bias=False, init_weights=False))
    assert not any("gnnmoe_bias" in n for n, _ in without.named_parameters())
    n_with = sum(p.numel() for p in with_bias.parameters() if p.requires_grad)
    n_without = sum(p.numel() for p in without.parameters() if p.requires_grad)
    assert n_with - n_without == 2 * 3 * 4 * 32  # blocks x layers x experts x out_features
    without.train()
    without(pixel_values=images).logits.sum().backward()


def test_re_adding_a_deleted_adapter_gets_fresh_routers(images, make_vit):
    model = get_peft_model(make_vit(), GNNMoEConfig())
    model.add_adapter("extra", GNNMoEConfig(num_experts=2, top_k=1))
    old = model.base_model.model.vit.layers[0].attention.q_proj.gnnmoe_router["extra"]
    model.delete_adapter("extra")
    model.add_adapter("extra", GNNMoEConfig(num_experts=3, top_k=1))
    attn = model.base_model.model.vit.layers[0].attention
    new = attn.q_proj.gnnmoe_router["extra"]
    assert new is not old
    assert new.num_experts == 3
    assert attn.k_proj.gnnmoe_router_ref["extra"] is new
    assert attn.v_proj.gnnmoe_router_ref["extra"] is new
    model.set_adapter("extra")
    model(pixel_values=images)

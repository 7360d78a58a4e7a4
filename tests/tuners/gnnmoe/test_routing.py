"""Routing under other forward modes: inference mode, mixed-adapter batches, shared routers over different inputs, and
the auxiliary losses against a hand computation."""

import math
import warnings

import pytest
import torch
from peft import get_peft_model

from peft_gnnmoe import GNNMoEConfig, get_aux_loss, get_routing_stats
from peft_gnnmoe.tuners.gnnmoe import graph


def test_inference_mode_works_and_equals_no_grad(make_vit, images):
    graph._spatial_adjacency.cache_clear()  # build the cached grid inside inference mode
    model = get_peft_model(make_vit(), GNNMoEConfig(init_weights=False)).eval()
    router = model.base_model.model.vit.layers[0].attention.q_proj.gnnmoe_router["default"]
    routings = []
    original_route = router._route
    router._route = lambda *args: routings.append(1) or original_route(*args)
    with torch.inference_mode():
        got = model(pixel_values=images).logits
    assert len(routings) == 1  # q, k and v still share one routing decision
    with torch.no_grad():
        expected = model(pixel_values=images).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    model.train()
    model(pixel_values=images).logits.sum().backward()  # training after inference mode, with the cached grid


def _two_adapters(make_vit):
    model = get_peft_model(make_vit(), GNNMoEConfig(init_weights=False, modules_to_save=["classifier"]))
    model.add_adapter("other", GNNMoEConfig(init_weights=False, router="gat", modules_to_save=["classifier"]))
    with torch.no_grad():  # give the second adapter's classifier copy other weights
        model.base_model.model.classifier.modules_to_save["other"].weight.mul_(-2.0)
    return model.eval()


def _alone(model, adapter, images):
    with torch.no_grad():
        if adapter == "__base__":
            with model.disable_adapter():
                return model(pixel_values=images).logits, None
        model.set_adapter(adapter)
        return model(pixel_values=images).logits, get_aux_loss(model)


def test_mixed_adapter_batches_route_every_sample_by_its_own_adapter(make_vit):
    model = _two_adapters(make_vit)
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    names = ["other", "default", "__base__", "other"]
    with torch.no_grad():
        mixed = model(pixel_values=images, adapter_names=names).logits
    mixed_aux = get_aux_loss(model)
    aux_sum = 0.0
    for row, name in enumerate(names):
        expected, aux = _alone(model, name, images[row : row + 1])
        torch.testing.assert_close(mixed[row : row + 1], expected, msg=name)
        aux_sum = aux_sum + (0.0 if aux is None else aux)
    assert not torch.allclose(mixed[0], mixed[1])  # the adapters differ, so the check above means something
    # each sample's aux loss comes from its own adapter's routers and weighs 1/B; "__base__" rows add nothing
    torch.testing.assert_close(mixed_aux, aux_sum / len(names))
    model.set_adapter("default")
    with torch.no_grad():
        torch.testing.assert_close(model(pixel_values=images).logits[1], mixed[1])  # no hook left behind


def test_mixed_adapter_batches_refuse_training_unknown_names_and_wrong_lengths(make_vit, images):
    model = _two_adapters(make_vit)
    with pytest.raises(ValueError, match="unknown adapters \\['typo'\\]"):
        model(pixel_values=images, adapter_names=["default", "typo"])
    with pytest.raises(ValueError, match="adapter_names has 3 entries for a batch of 2"):
        model(pixel_values=images, adapter_names=["default", "other", "other"])
    model.train()
    with pytest.raises(ValueError, match="in training mode"):
        model(pixel_values=images, adapter_names=["default", "other"])


def _copy_adapter(source, target) -> None:
    target_params = dict(target.named_parameters())
    with torch.no_grad():
        for name, param in source.named_parameters():
            target_params[name].copy_(param)


def test_shared_router_over_different_inputs_counts_every_routing(make_vit, images):
    common = dict(target_modules=["q_proj", "o_proj"], init_weights=False, router_noise_std=0.0)
    shared = get_peft_model(make_vit(), GNNMoEConfig(shared_router_groups=[["q_proj", "o_proj"]], **common))
    separate = get_peft_model(make_vit(), GNNMoEConfig(shared_router_groups=[], **common))
    _copy_adapter(shared, separate)  # same experts; q's router copied into separate's q router
    for block in range(2):
        attention = separate.base_model.model.vit.layers[block].attention
        attention.o_proj.gnnmoe_router["default"].load_state_dict(
            attention.q_proj.gnnmoe_router["default"].state_dict()
        )
    shared.eval()
    separate.eval()
    with torch.no_grad():
        torch.testing.assert_close(shared(pixel_values=images).logits, separate(pixel_values=images).logits)
    assert len(get_routing_stats(shared)) == 2
    assert len(get_routing_stats(separate)) == 4
    # q and o see different inputs: the shared router routes twice per block, and both routings count
    torch.testing.assert_close(get_aux_loss(shared), get_aux_loss(separate))


@pytest.mark.parametrize("kind,balance", [("switch", 4 * (0.5 * 0.5 + 0.5 * 0.25)), ("squared_mean", None)])
def test_balance_and_z_loss_match_a_hand_computation(kind, balance, make_vit, images):
    # every token gets the logits log([4, 2, 1, 1]): p = [1/2, 1/4, 1/8, 1/8], top-2 = experts 0 and 1 (f = 1/2 each)
    if balance is None:
        balance = 4 * (0.5**2 + 0.25**2 + 2 * 0.125**2)
    z_loss = math.log(8.0) ** 2  # logsumexp(log 4, log 2, 0, 0) = log 8
    config = GNNMoEConfig(balance_loss=kind, balance_loss_weight=0.5, z_loss_weight=0.1, router_noise_std=0.0)
    model = get_peft_model(make_vit(), config)
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.endswith("gnnmoe_router.default"):
                module.head.weight.zero_()
                module.head.bias.copy_(torch.tensor([4.0, 2.0, 1.0, 1.0]).log())
    model(pixel_values=images)
    stats = get_routing_stats(model)
    assert len(stats) == 2
    for values in stats.values():
        torch.testing.assert_close(torch.tensor(values["load"]), torch.tensor([0.5, 0.5, 0.0, 0.0]))
        assert values["balance_loss"] == pytest.approx(balance, rel=1e-6)
        assert values["z_loss"] == pytest.approx(z_loss, rel=1e-6)
    assert get_aux_loss(model).item() == pytest.approx(2 * (0.5 * balance + 0.1 * z_loss), rel=1e-6)


def test_training_without_a_loss_in_the_output_warns_once(make_vit, images):
    model = get_peft_model(make_vit(), GNNMoEConfig()).train()
    with pytest.warns(UserWarning, match="auxiliary loss was not added"):
        model(pixel_values=images)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(pixel_values=images)  # once per model
        model.eval()(pixel_values=images)

"""The tuner's cached router lists: no module-tree walk per forward pass, and the cache follows the adapters."""

import torch
from peft import get_peft_model

from peft_gnnmoe import GNNMoEConfig, get_aux_loss


class _CountingWalk:
    """Wraps ``model.named_modules`` (the real one runs) and counts the calls."""

    def __init__(self, module):
        self.original, self.calls = module.named_modules, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.original(*args, **kwargs)


def test_a_forward_pass_does_not_walk_the_module_tree(make_vit, images, labels):
    model = get_peft_model(make_vit(), GNNMoEConfig(init_weights=False))
    model(pixel_values=images, labels=labels)  # the first forward fills the cache
    inner = model.base_model.model
    walk = _CountingWalk(inner)
    inner.named_modules = walk
    model(pixel_values=images, labels=labels)
    assert walk.calls == 0


def test_routers_of_an_added_and_activated_adapter_route_the_next_forward(make_vit, images, labels):
    model = get_peft_model(make_vit(), GNNMoEConfig(init_weights=False))
    model(pixel_values=images, labels=labels)
    model.add_adapter("other", GNNMoEConfig(init_weights=False, router="gat", num_experts=2, top_k=1))
    model.set_adapter("other")
    model(pixel_values=images, labels=labels)
    routers = model.base_model.active_routers()
    attention = model.base_model.model.vit.layers[0].attention
    assert routers["vit.layers.0.attention.q_proj"] is attention.q_proj.gnnmoe_router["other"]
    assert all(len(router.routings) == 1 for router in routers.values())
    assert get_aux_loss(model) is not None


def test_a_deleted_adapter_leaves_the_router_lists(make_vit, images, labels):
    model = get_peft_model(make_vit(), GNNMoEConfig(init_weights=False))
    model.add_adapter("other", GNNMoEConfig(init_weights=False, router="gat", num_experts=2, top_k=1))
    model(pixel_values=images, labels=labels)
    old = set(map(id, model.base_model._routers(["default", "other"]).values()))
    model.set_adapter("other")
    model.delete_adapter("default")
    model(pixel_values=images, labels=labels)
    remaining = model.base_model._routers(list(model.peft_config)).values()
    assert len(remaining) == 2  # one router per block (q/k/v share it)
    assert all(id(router) in old for router in remaining)
    assert all(router.num_experts == 2 for router in remaining)


def test_the_returned_router_dict_is_a_copy(make_vit):
    model = get_peft_model(make_vit(), GNNMoEConfig())
    model.base_model.active_routers().clear()
    assert len(model.base_model.active_routers()) == 2


def test_unload_forgets_the_routers(make_vit, images):
    model = get_peft_model(make_vit(), GNNMoEConfig(init_weights=False))
    model(pixel_values=images)
    model.unload()
    assert model.base_model.active_routers() == {}
    with torch.no_grad():
        model.base_model.model(pixel_values=images)

import json

import pytest
import torch
from peft import PeftConfig, get_peft_model

import peft_gnnmoe
from peft_gnnmoe import GNNMoEConfig


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(num_experts=0), "num_experts must be a positive integer"),
        (dict(num_experts=2.5), "num_experts must be a positive integer"),
        (dict(top_k=0), "top_k must be a positive integer"),
        (dict(top_k=5, num_experts=4), "top_k=5 exceeds num_experts=4"),
        (dict(kron_factor=0), "kron_factor must be a positive integer"),
        (dict(kron_rank=-1), "kron_rank must be a positive integer"),
        (dict(router="gin"), "router='gin' is unknown"),
        (dict(router_hidden=0), "router_hidden must be a positive integer"),
        (dict(router_layers=0), "router_layers must be a positive integer"),
        (dict(router_heads=0), "router_heads must be a positive integer"),
        (dict(router="gat", router_hidden=30, router_heads=4), "not divisible by router_heads"),
        (dict(router_dropout=1.0), "router_dropout must be in"),
        (dict(expert_dropout=-0.1), "expert_dropout must be in"),
        (dict(router_noise_std=-1.0), "router_noise_std must be >= 0"),
        (dict(router_temperature=0.0), "router_temperature must be > 0"),
        (dict(graph="radius4"), "graph='radius4' is unknown"),  # "radius" became a mode (issue 12)
        (dict(knn_k=0), "knn_k must be a positive integer"),
        (dict(prefix_tokens="drop"), "prefix_tokens='drop' is unknown"),
        (dict(num_prefix_tokens=-1), "num_prefix_tokens must be None or >= 0"),
        (dict(patch_grid=[4]), "patch_grid must be"),
        (dict(patch_grid=[4, 0]), "patch_grid must be"),
        (dict(shared_router_groups=["q_proj"]), "shared_router_groups must be a list of lists"),
        (dict(balance_loss="l2"), "balance_loss='l2' is unknown"),
        (dict(balance_loss_weight=-0.1), "balance_loss_weight must be >= 0"),
        (dict(z_loss_weight=-1.0), "z_loss_weight must be >= 0"),
        (dict(layers_pattern="layers"), "layers_pattern only works together with layers_to_transform"),
        (dict(router="mlp"), "router='mlp' is unknown"),
        (dict(graph="grid16"), "graph='grid16' is unknown"),
        (dict(graph="grid8+knn"), "graph='grid8\\+knn' is unknown"),
        (dict(graph="radius", graph_radius=0.0), "graph_radius must be > 0"),
        (dict(graph="radius", graph_radius=-1.5), "graph_radius must be > 0"),
    ],
)
def test_invalid_config_fields_fail_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GNNMoEConfig(**kwargs)


_FLOAT_FIELDS = [
    "router_dropout",
    "router_noise_std",
    "router_temperature",
    "balance_loss_weight",
    "z_loss_weight",
    "expert_dropout",
    "graph_radius",
]


@pytest.mark.parametrize("name", _FLOAT_FIELDS)
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf"), "0.1", None])
def test_float_fields_must_be_finite_numbers(name, value):
    with pytest.raises(ValueError, match=f"GNNMoEConfig.{name} must be a finite number"):
        GNNMoEConfig(**{name: value})


@pytest.mark.parametrize("name", ["add_aux_loss_to_output", "expert_bias", "init_weights", "inference_mode"])
@pytest.mark.parametrize("value", ["gaussian", 1, 0, None, "True"])
def test_bool_fields_must_be_bool(name, value):
    with pytest.raises(ValueError, match=f"GNNMoEConfig.{name} must be True or False"):
        GNNMoEConfig(**{name: value})


def test_the_issue_examples_name_the_field():
    with pytest.raises(ValueError, match="balance_loss_weight must be a finite number, got nan"):
        GNNMoEConfig(balance_loss_weight=float("nan"))
    with pytest.raises(ValueError, match="router_noise_std must be a finite number, got inf"):
        GNNMoEConfig(router_noise_std=float("inf"))
    with pytest.raises(ValueError, match="init_weights must be True or False, got 'gaussian'"):
        GNNMoEConfig(init_weights="gaussian")


def test_valid_config_round_trips_through_json(tmp_path):
    cfg = GNNMoEConfig(router="sage", num_experts=6, top_k=6, patch_grid=[4, 4], target_modules=["q_proj", "fc1"])
    cfg.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "GNNMOE"
    loaded = PeftConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, GNNMoEConfig)
    assert (loaded.router, loaded.num_experts, loaded.top_k, loaded.patch_grid) == ("sage", 6, 6, [4, 4])
    assert set(loaded.target_modules) == {"q_proj", "fc1"}


def test_kron_factor_that_cannot_tile_a_layer_fails_naming_the_layer(make_vit):
    with pytest.raises(ValueError, match=r"Cannot adapt vit\.layers\.0\.attention\.q_proj: kron_factor=5"):
        get_peft_model(make_vit(), GNNMoEConfig(kron_factor=5))


def test_unknown_architecture_without_targets_asks_for_target_modules():
    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(8, 8)

        def forward(self, x):
            return self.proj(x)

    with pytest.raises(ValueError, match="target_modules"):
        get_peft_model(Tiny(), GNNMoEConfig())


def test_non_linear_target_is_rejected(make_vit):
    with pytest.raises(TypeError, match="torch.nn.Linear layers only"):
        get_peft_model(make_vit(), GNNMoEConfig(target_modules=["layernorm_before"]))


def test_registration_is_idempotent_and_keeps_peft_types_working(make_vit):
    import importlib

    from peft import LoraConfig
    from peft.utils import PeftType

    importlib.reload(peft_gnnmoe.tuners.gnnmoe)
    assert PeftType("GNNMOE") is PeftType.GNNMOE
    assert "GNNMOE" in [t.value for t in PeftType]
    model = get_peft_model(make_vit(), LoraConfig(target_modules=["q_proj"]))
    assert model.peft_config["default"].peft_type == PeftType.LORA


@pytest.mark.parametrize("graph", ["knn", "grid", "knn+grid", "grid8", "knn+grid8", "radius", "full"])
@pytest.mark.parametrize("router", ["gcn", "gat", "sage", "linear"])
def test_every_router_and_graph_mode_is_accepted(router, graph):
    config = GNNMoEConfig(router=router, graph=graph, graph_radius=1.5)
    assert (config.router, config.graph, config.graph_radius) == (router, graph, 1.5)


def test_graph_radius_round_trips_through_json(tmp_path):
    GNNMoEConfig(graph="radius", graph_radius=3.0).save_pretrained(str(tmp_path))
    assert GNNMoEConfig.from_pretrained(str(tmp_path)).graph_radius == 3.0

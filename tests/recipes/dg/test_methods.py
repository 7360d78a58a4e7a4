"""The DG recipe's methods: built from the library's names and defaults, on the embedded benchmark's backbone."""

import pytest
import torch

from peft_gnnmoe import GNNMoEConfig
from peft_gnnmoe.tuners.gnnmoe.config import ROUTER_TYPES
from recipes.dg import methods, train

CLASSES = [str(d) for d in range(10)]


def hp(**kw):
    return methods.MethodArgs(**kw)


def test_gnnmoe_defaults_are_the_librarys():
    library = GNNMoEConfig()
    cfg = train.parse_args([])
    for name in ("num_experts", "top_k", "kron_rank", "kron_factor"):
        assert getattr(cfg.model, name) == getattr(library, name), name
        assert getattr(methods.MethodArgs(), name) == getattr(library, name), name


def test_every_library_router_is_a_method():
    assert set(ROUTER_TYPES) <= set(methods.ROUTERS)
    assert methods.expand_methods(["gnnmoe", "lora"], list(methods.GNN_ROUTERS)) == [
        "gnnmoe-gcn",
        "gnnmoe-gat",
        "gnnmoe-sage",
        "lora",
    ]
    with pytest.raises(ValueError, match="Unknown router"):
        methods.expand_methods(["gnnmoe"], ["gin"])


def test_a_router_can_be_named_in_the_method():
    assert methods.expand_methods(["gnnmoe-linear", "kadapter"], ["gcn"]) == ["gnnmoe-linear", "kadapter"]
    with pytest.raises(ValueError, match="Unknown router"):
        methods.expand_methods(["gnnmoe-gin"], ["gcn"])


def test_main_job_defaults_run_one_router_and_no_ablations():
    cfg = train.parse_args([])
    assert cfg.model.router == [GNNMoEConfig().router]
    assert cfg.model.method == ["gnnmoe", "lora", "lokr", "probe", "full"]


def test_unknown_method_fails_before_any_data_is_loaded():
    with pytest.raises(ValueError, match="Unknown method"):
        train.parse_args(["--method", "adapterx"])


def test_kadapter_is_one_kronecker_expert_with_a_frozen_router():
    model = methods.build_model("kadapter", train.EMBEDDED_BACKBONE, CLASSES, methods.MethodArgs())
    config = model.peft_config["default"]
    assert config.num_experts == 1
    assert config.top_k == 1
    router = [p for n, p in model.named_parameters() if "gnnmoe_router." in n]
    assert router
    assert not any(p.requires_grad for p in router)
    trainable, _ = methods.count_parameters(model)
    gnnmoe, _ = methods.count_parameters(methods.build_model("gnnmoe-gcn", train.EMBEDDED_BACKBONE, CLASSES, hp()))
    assert trainable < gnnmoe
    with torch.no_grad():
        logits = model(pixel_values=torch.zeros(2, 3, 28, 28)).logits
    assert logits.shape == (2, 10)


@pytest.mark.parametrize("graph", ["knn", "grid", "knn+grid"])
def test_graph_and_prefix_options_reach_the_config(graph):
    model = methods.build_model(
        "gnnmoe-gcn", train.EMBEDDED_BACKBONE, CLASSES, hp(graph=graph, prefix_tokens="isolated")
    )
    config = model.peft_config["default"]
    assert config.graph == graph
    assert config.prefix_tokens == "isolated"


def test_unset_graph_options_keep_the_library_defaults():
    model = methods.build_model("gnnmoe-gcn", train.EMBEDDED_BACKBONE, CLASSES, hp())
    config = model.peft_config["default"]
    assert config.graph == GNNMoEConfig().graph
    assert config.prefix_tokens == GNNMoEConfig().prefix_tokens


def test_token_router_method_builds_and_runs():
    model = methods.build_model("gnnmoe-linear", train.EMBEDDED_BACKBONE, CLASSES, hp())
    assert model.peft_config["default"].router == "linear"
    with torch.no_grad():
        logits = model(pixel_values=torch.zeros(2, 3, 28, 28)).logits
    assert logits.shape == (2, 10)


@pytest.mark.parametrize("graph", ["grid8", "knn+grid8", "radius", "full"])
def test_new_graph_modes_build_and_run(graph):
    model = methods.build_model("gnnmoe-gcn", train.EMBEDDED_BACKBONE, CLASSES, hp(graph=graph, graph_radius=1.5))
    config = model.peft_config["default"]
    assert config.graph == graph
    assert config.graph_radius == 1.5
    with torch.no_grad():
        logits = model(pixel_values=torch.zeros(2, 3, 28, 28)).logits
    assert logits.shape == (2, 10)


def test_gnnmoe_adapts_qkv_and_reports_routing_while_lora_does_not():
    hp = methods.MethodArgs()
    gnnmoe = methods.build_model("gnnmoe-gat", train.EMBEDDED_BACKBONE, CLASSES, hp)
    config = gnnmoe.peft_config["default"]
    assert config.router == "gat"
    assert set(config.target_modules) == {"q_proj", "k_proj", "v_proj"}
    assert config.modules_to_save == ["classifier"]
    lora = methods.build_model("lora", train.EMBEDDED_BACKBONE, CLASSES, hp)
    x = torch.zeros(2, 3, 28, 28)
    with torch.no_grad():
        gnnmoe(pixel_values=x)
        lora(pixel_values=x)
    assignments = methods.routing_assignments(gnnmoe)
    assert len(assignments) == 4  # one shared q/k/v router per block of the 4-block backbone
    assert methods.routing_entropy(gnnmoe) > 0
    assert methods.routing_assignments(lora) is None
    assert methods.routing_entropy(lora) is None


def test_qkv_names_refuses_a_model_without_them():
    with pytest.raises(ValueError, match="no q/k/v projections"):
        methods.qkv_names(torch.nn.Sequential(torch.nn.Linear(2, 2)))

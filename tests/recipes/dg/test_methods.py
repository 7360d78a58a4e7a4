"""The DG recipe's methods: built from the library's names and defaults, on the embedded benchmark's backbone."""

import pytest
import torch

from peft_gnnmoe import GNNMoEConfig
from recipes.dg import methods, train

CLASSES = [str(d) for d in range(10)]


def test_gnnmoe_defaults_are_the_librarys():
    library = GNNMoEConfig()
    args = train.parse_args([])
    for name in ("num_experts", "top_k", "kron_rank", "kron_factor"):
        assert getattr(args, name) == getattr(library, name), name
        assert getattr(methods.MethodArgs(), name) == getattr(library, name), name


def test_every_library_router_is_a_method():
    assert methods.expand_methods(["gnnmoe", "lora"], list(methods.ROUTERS)) == [
        "gnnmoe-gcn",
        "gnnmoe-gat",
        "gnnmoe-sage",
        "lora",
    ]
    with pytest.raises(ValueError, match="Unknown router"):
        methods.expand_methods(["gnnmoe"], ["gin"])


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

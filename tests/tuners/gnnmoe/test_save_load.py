import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from peft import AutoPeftModel, PeftConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import ViTForImageClassification

from peft_gnnmoe import GNNMoEConfig

REPO = Path(__file__).resolve().parents[3]


def _trained_adapter(make_vit, tmp_path, router="gat", **cfg):
    base_dir = tmp_path / "base"
    make_vit(seed=0).save_pretrained(base_dir)  # a local "Hub" checkpoint of the base model
    config = GNNMoEConfig(router=router, init_weights=False, modules_to_save=["classifier"], **cfg)
    model = get_peft_model(ViTForImageClassification.from_pretrained(base_dir), config)
    adapter_dir = tmp_path / "adapter"
    model.save_pretrained(adapter_dir)
    return model.eval(), base_dir, adapter_dir


def test_saved_adapter_is_a_standard_peft_repo(tmp_path, make_vit):
    model, base_dir, adapter_dir = _trained_adapter(make_vit, tmp_path)
    files = {p.name for p in adapter_dir.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= files
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert config["peft_type"] == "GNNMOE"
    assert config["router"] == "gat"
    keys = load_file(adapter_dir / "adapter_model.safetensors").keys()
    assert any(".gnnmoe_router.convs.0." in k for k in keys)  # routers are saved, without the adapter name
    assert not any(".default." in k for k in keys)
    # only the owner of a shared router saves it: one router per block
    assert len({k.split(".gnnmoe_router.")[0] for k in keys if ".gnnmoe_router." in k}) == 2
    card = (adapter_dir / "README.md").read_text()
    assert "library_name: peft" in card
    assert f"base_model: {base_dir}" in card
    assert "- gnnmoe" in card


@pytest.mark.slow
def test_reload_in_a_fresh_process_gives_identical_outputs(tmp_path, images, make_vit):
    model, base_dir, adapter_dir = _trained_adapter(make_vit, tmp_path, router="sage")
    with torch.no_grad():
        expected = model(pixel_values=images).logits
    torch.save({"images": images, "expected": expected}, tmp_path / "io.pt")
    script = textwrap.dedent(
        f"""
        import torch, peft_gnnmoe
        from peft import PeftModel
        from transformers import ViTForImageClassification
        io = torch.load({str(tmp_path / "io.pt")!r})
        base = ViTForImageClassification.from_pretrained({str(base_dir)!r})
        model = PeftModel.from_pretrained(base, {str(adapter_dir)!r}, adapter_name="renamed").eval()
        with torch.no_grad():
            got = model(pixel_values=io["images"]).logits
        assert torch.equal(got, io["expected"]), (got - io["expected"]).abs().max()
        print("IDENTICAL")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert "IDENTICAL" in result.stdout, result.stderr[-2000:]


def test_peft_config_and_auto_peft_model_load_from_local_folders(tmp_path, images, make_vit):
    model, base_dir, adapter_dir = _trained_adapter(make_vit, tmp_path)
    assert isinstance(PeftConfig.from_pretrained(adapter_dir), GNNMoEConfig)
    auto = AutoPeftModel.from_pretrained(adapter_dir).eval()
    with torch.no_grad():
        torch.testing.assert_close(auto(pixel_values=images).logits, model(pixel_values=images).logits)


def test_adapter_with_missing_tensors_is_rejected(tmp_path, make_vit):
    _, base_dir, adapter_dir = _trained_adapter(make_vit, tmp_path)
    path = adapter_dir / "adapter_model.safetensors"
    tensors = load_file(path)
    save_file({k: v for k, v in tensors.items() if "gnnmoe_router" not in k}, path)
    with pytest.raises(ValueError, match="adapter tensors are missing"):
        PeftModel.from_pretrained(make_vit(seed=0), adapter_dir)


def test_adapter_for_another_architecture_is_rejected(tmp_path, make_vit):
    _, _, adapter_dir = _trained_adapter(make_vit, tmp_path)
    with pytest.raises(RuntimeError, match="size mismatch"):
        PeftModel.from_pretrained(make_vit(seed=0, hidden_size=64), adapter_dir)


def test_corrupt_safetensors_is_rejected_and_the_file_left_alone(tmp_path, make_vit):
    _, _, adapter_dir = _trained_adapter(make_vit, tmp_path)
    path = adapter_dir / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    before = path.read_bytes()
    with pytest.raises(Exception, match="(?i)deserializ|header|incomplete|invalid"):
        PeftModel.from_pretrained(make_vit(seed=0), adapter_dir)
    assert path.read_bytes() == before


def test_pickled_weights_are_refused(tmp_path, make_vit):
    _, _, adapter_dir = _trained_adapter(make_vit, tmp_path)
    path = adapter_dir / "adapter_model.safetensors"
    torch.save(load_file(path), adapter_dir / "adapter_model.bin")
    path.unlink()
    with pytest.raises(ValueError, match="only reads safetensors"):
        PeftModel.from_pretrained(make_vit(seed=0), adapter_dir)


def test_second_adapter_saves_and_loads_by_name(tmp_path, images, make_vit):
    model = get_peft_model(make_vit(seed=0), GNNMoEConfig(init_weights=False))
    model.add_adapter("b", GNNMoEConfig(init_weights=False, router="gcn", num_experts=2, top_k=1))
    model.set_adapter("b")
    model.eval()
    with torch.no_grad():
        expected = model(pixel_values=images).logits
    model.save_pretrained(tmp_path)  # writes default/ at the root and b/ in a subfolder
    loaded = PeftModel.from_pretrained(make_vit(seed=0), tmp_path / "b", adapter_name="b").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixel_values=images).logits, expected)


def test_adapter_with_extra_layers_is_rejected(tmp_path, make_vit):
    model = get_peft_model(make_vit(seed=0, num_hidden_layers=4), GNNMoEConfig(init_weights=False))
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"adapter tensors have no place in it.*vit\.layers\.[23]\."):
        PeftModel.from_pretrained(make_vit(seed=0), tmp_path)


def test_expert_biases_are_not_dropped_when_the_config_was_edited(tmp_path, make_vit):
    _, _, adapter_dir = _trained_adapter(make_vit, tmp_path)
    path = adapter_dir / "adapter_config.json"
    config = json.loads(path.read_text())
    assert config["expert_bias"] is True
    path.write_text(json.dumps(dict(config, expert_bias=False)))
    with pytest.raises(ValueError, match=r"have no place in it.*gnnmoe_bias.*expert_bias"):
        PeftModel.from_pretrained(make_vit(seed=0), adapter_dir)


def test_pickled_weights_are_refused_at_save_time(tmp_path, make_vit):
    model = get_peft_model(make_vit(seed=0), GNNMoEConfig())
    with pytest.raises(ValueError, match=r"safetensors only.*unpickling can run arbitrary code"):
        model.save_pretrained(tmp_path, safe_serialization=False)
    assert not (tmp_path / "adapter_model.bin").exists()
    assert not (tmp_path / "adapter_config.json").exists()


def _python_block(card: str) -> str:
    start = card.index("```python\n") + len("```python\n")
    return card[start : card.index("```", start)]


@pytest.mark.slow
def test_model_card_shows_a_loading_snippet_that_works(tmp_path, make_vit, images):
    model, base_dir, adapter_dir = _trained_adapter(make_vit, tmp_path)
    model.save_pretrained(adapter_dir)  # saving again replaces the section instead of adding a second one
    card = (adapter_dir / "README.md").read_text()
    assert card.count("import peft_gnnmoe") == 2  # the text says it, the snippet does it
    assert "KeyError: 'GNNMOE'" in card
    assert "library_name: peft" in card  # PEFT's own card is kept
    snippet = _python_block(card)
    assert snippet.startswith("import peft_gnnmoe")
    assert "from transformers import ViTForImageClassification" in snippet
    assert repr(str(base_dir)) in snippet  # the base model the adapter was trained on
    with torch.no_grad():
        expected = model(pixel_values=images).logits
    torch.save({"images": images, "expected": expected}, tmp_path / "io.pt")
    script = snippet.replace("path/to/this/adapter", str(adapter_dir)) + textwrap.dedent(
        f"""
        import torch
        io = torch.load({str(tmp_path / "io.pt")!r})
        with torch.no_grad():
            got = model.eval()(pixel_values=io["images"]).logits
        assert torch.equal(got, io["expected"]), (got - io["expected"]).abs().max()
        print("LOADED", type(model).__name__)
        """
    )
    env = dict(os.environ, PYTHONPATH=str(REPO))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert "LOADED PeftModel" in result.stdout, result.stderr[-2000:]


def test_every_saved_adapter_folder_gets_the_snippet(tmp_path, make_vit):
    model = get_peft_model(make_vit(seed=0), GNNMoEConfig())
    model.add_adapter("b", GNNMoEConfig(num_experts=2, top_k=1))
    model.save_pretrained(tmp_path)
    assert _python_block((tmp_path / "b" / "README.md").read_text()).startswith("import peft_gnnmoe")
    config_only = tmp_path / "config_only"
    GNNMoEConfig().save_pretrained(config_only)  # no weights next to it: no card
    assert not (config_only / "README.md").exists()

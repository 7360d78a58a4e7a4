"""The ``accelerate config`` files the pages show (``yaml`` blocks with a ``distributed_type``) are valid for the
installed accelerate: its own loader takes them, every key of their ``fsdp_config`` / ``deepspeed_config`` is an
option of ``accelerate launch`` (which would ignore a misspelt one), and the block classes they wrap exist in
transformers. They cannot run here: accelerate's FSDP and DeepSpeed plugins need GPUs."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import yaml

from tests.docs.snippets import code_blocks

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = [
    block
    for page in sorted((ROOT / "docs").rglob("*.md"))
    for block in code_blocks(page)
    if block.language == "yaml" and "distributed_type:" in block.code
]
configs = pytest.mark.parametrize("block", CONFIGS, ids=lambda b: f"{b.page.relative_to(ROOT)}:{b.line}")


def _launch_options() -> set[str]:
    from accelerate.commands.launch import launch_command_parser

    return {action.dest for action in launch_command_parser()._actions}


def _transformers_class(name: str) -> type | None:
    """The transformers class ``name`` (e.g. ``ViTLayer``), looked up in the modeling module of its model type."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    model_types = [t.replace("-", "_") for t in CONFIG_MAPPING_NAMES if name.lower().startswith(t.replace("-", ""))]
    for model_type in sorted(model_types, key=len, reverse=True):
        try:
            module = importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
        except ImportError:
            continue
        if hasattr(module, name):
            return getattr(module, name)
    return None


@pytest.mark.parametrize("page", ["recipes/dg.md", "recipes/avsr.md"])
def test_recipe_pages_show_fsdp2_and_zero3(page):
    kinds = set()
    for block in CONFIGS:
        if block.page == ROOT / "docs" / page:
            config = yaml.safe_load(block.code)
            fsdp, deepspeed = config.get("fsdp_config", {}), config.get("deepspeed_config", {})
            kinds.add((config["distributed_type"], fsdp.get("fsdp_version"), deepspeed.get("zero_stage")))
    assert kinds == {("FSDP", 2, None), ("DEEPSPEED", None, 3)}


@configs
def test_accelerate_loads_the_config(block, tmp_path):
    from accelerate.commands.config.config_args import ClusterConfig

    path = tmp_path / "config.yaml"
    path.write_text(block.code)
    ClusterConfig.from_yaml_file(path)


@configs
def test_plugin_keys_are_launch_options(block):
    config = yaml.safe_load(block.code)
    keys = {k if k.startswith("fsdp") else f"fsdp_{k}" for k in config.get("fsdp_config", {})}
    keys |= set(config.get("deepspeed_config", {}))
    assert keys - _launch_options() == set()


@configs
def test_wrapped_classes_exist_in_transformers(block):
    wrapped = yaml.safe_load(block.code).get("fsdp_config", {}).get("fsdp_transformer_layer_cls_to_wrap", "")
    names = [name.strip() for name in wrapped.split(",") if name.strip()]
    assert [name for name in names if _transformers_class(name) is None] == []

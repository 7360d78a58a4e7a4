"""The package a user installs: ``python -m build`` gives a wheel and an sdist that pass ``twine check``; the wheel
holds only ``peft_gnnmoe``; in a fresh environment that holds nothing but the wheel's declared requirements (shared
from this environment by ``scripts/fresh_venv.py``, not downloaded again) it installs without a package index, and
there, with no clone on the path, the README's quickstarts and the model card's loading snippet run.
"""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import peft_gnnmoe

pytestmark = pytest.mark.slow  # builds the wheel and sdist and a fresh environment
ROOT = Path(__file__).resolve().parents[1]

# Saves a GNN-MoE adapter (tiny ViT) and a sink-decorrelation adapter (tiny Llama) with the installed wheel, each on a
# base model saved in a folder, and the outputs they give; run by the fresh environment's python.
SAVE_ADAPTERS = """
import sys, torch, transformers as T
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file
import peft_gnnmoe

work = sys.argv[1]
torch.manual_seed(0)
T.ViTForImageClassification(T.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
    intermediate_size=64, image_size=32, patch_size=8, num_labels=3)).save_pretrained(f"{work}/vit")
T.LlamaForCausalLM(T.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    num_attention_heads=2, num_key_value_heads=2, bos_token_id=1)).save_pretrained(f"{work}/llama")
vit = get_peft_model(T.ViTForImageClassification.from_pretrained(f"{work}/vit"), peft_gnnmoe.GNNMoEConfig())
llm = get_peft_model(T.LlamaForCausalLM.from_pretrained(f"{work}/llama"),
    peft_gnnmoe.SinkDecorrelationConfig(base_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"])))
for model in (vit, llm):  # non-zero adapter weights, so that loading them changes the outputs
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
vit.save_pretrained(f"{work}/vit-adapter")
llm.save_pretrained(f"{work}/llama-adapter")
pixels, ids = torch.randn(2, 3, 32, 32), torch.tensor([[1, 5, 9, 12]])
save_file({"pixels": pixels, "ids": ids, "vit": vit.eval()(pixel_values=pixels).logits.detach(),
    "llama": llm.eval()(input_ids=ids).logits.detach()}, f"{work}/expected.safetensors")
"""

# Runs the loading snippet of each adapter's model card as it stands (adapter placeholder replaced by the folder) in
# this fresh process, where nothing has imported peft_gnnmoe before, and compares the outputs.
RUN_CARD_SNIPPETS = """
import re, sys, torch
from safetensors.torch import load_file

work = sys.argv[1]
expected = load_file(f"{work}/expected.safetensors")
for adapter, call in (("vit-adapter", lambda m: m(pixel_values=expected["pixels"])),
                      ("llama-adapter", lambda m: m(input_ids=expected["ids"]))):
    card = open(f"{work}/{adapter}/README.md").read()
    snippet = re.search(r"```python\\n(.*?)```", card, re.S).group(1)
    namespace = {}
    exec(snippet.replace("path/to/this/adapter", f"{work}/{adapter}"), namespace)
    out = call(namespace["model"].eval()).logits
    torch.testing.assert_close(out, expected[adapter.split("-")[0]])
    print(adapter, "loaded from its model card's snippet: identical outputs")
"""


def _run(command: list, cwd: Path) -> str:
    done = subprocess.run([str(c) for c in command], cwd=cwd, capture_output=True, text=True)
    assert done.returncode == 0, f"{command} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    _run([sys.executable, "-m", "build", "--no-isolation", "--outdir", out, ROOT], cwd=ROOT)
    return out


@pytest.fixture(scope="module")
def wheel(dist) -> Path:
    (path,) = dist.glob("*.whl")
    return path


@pytest.fixture(scope="module")
def fresh_python(wheel, tmp_path_factory) -> Path:
    """A new venv holding the wheel's declared requirements (shared) and the wheel, installed without an index."""
    folder = tmp_path_factory.mktemp("fresh") / "venv"
    python = _run([sys.executable, ROOT / "scripts" / "fresh_venv.py", folder, "--share-requirements-of", wheel], ROOT)
    python = Path(python.strip())
    _run([python, "-m", "pip", "install", "-q", "--no-index", wheel], cwd=folder.parent)
    return python


def test_wheel_and_sdist_pass_twine_check(dist):
    _run([sys.executable, "-m", "twine", "check", "--strict", *sorted(dist.iterdir())], cwd=dist)


def test_wheel_holds_only_the_library(wheel):
    with zipfile.ZipFile(wheel) as archive:
        tops = {name.split("/")[0] for name in archive.namelist()}
    assert tops == {"peft_gnnmoe", f"peft_gnnmoe-{peft_gnnmoe.__version__}.dist-info"}


def test_wheel_carries_the_version(wheel):
    assert wheel.name.startswith(f"peft_gnnmoe-{peft_gnnmoe.__version__}-")


def test_the_fresh_environment_sees_the_wheel_and_no_clone(fresh_python, tmp_path):
    probe = (
        "import importlib.util, peft_gnnmoe; print(peft_gnnmoe.__file__); "
        "print(importlib.util.find_spec('recipes')); print(importlib.util.find_spec('datasets'))"
    )
    location, recipes, datasets = _run([fresh_python, "-c", probe], cwd=tmp_path).split()
    assert Path(location).is_relative_to(fresh_python.parents[1])
    assert (recipes, datasets) == ("None", "None")  # no clone, and no recipe dependency, on the path


def test_the_command_line_entry_point_is_installed(fresh_python, tmp_path):
    assert "analyze" in _run([fresh_python.parent / "peft-gnnmoe", "--help"], cwd=tmp_path)


def test_readme_quickstarts_run_in_the_fresh_environment(fresh_python, tmp_path):
    """The README's Python blocks (both quickstarts) against tiny stand-ins of the Hub models they name."""
    runner = ROOT / "tests" / "docs" / "snippets.py"  # a script that imports nothing from the clone
    out = _run([fresh_python, runner, "--workdir", tmp_path / "work", ROOT / "README.md"], cwd=tmp_path)
    blocks = (ROOT / "README.md").read_text().count("\n```python\n")
    assert blocks >= 2  # a quickstart per tuner
    assert f"{blocks} python blocks" in out


def test_model_card_snippets_load_the_adapters_in_a_fresh_process(fresh_python, tmp_path):
    _run([fresh_python, "-c", SAVE_ADAPTERS, tmp_path], cwd=tmp_path)
    out = _run([fresh_python, "-c", RUN_CARD_SNIPPETS, tmp_path], cwd=tmp_path)
    assert out.count("identical outputs") == 2

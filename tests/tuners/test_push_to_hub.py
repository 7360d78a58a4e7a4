"""``model.push_to_hub(repo_id)`` for both tuners, against a local stand-in for the Hub, and loading from it.

The stand-in replaces only the two calls of ``push_to_hub`` that write to the Hub, ``HfApi.create_repo`` and
``HfApi.create_commit``: they write each commit's files into a repository of a local Hugging Face cache (a new
snapshot per commit, ``refs/main`` pointing at it). Everything else is the real code: transformers' ``push_to_hub``,
PEFT's ``save_pretrained``, and, with ``HF_HUB_OFFLINE=1``, huggingface_hub's resolution of repo ids for the card
lookup and for ``PeftModel`` / ``AutoPeftModel.from_pretrained`` in a fresh process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import peft_gnnmoe

FAKE_HUB = """
import hashlib, pathlib, shutil, sys
from huggingface_hub import HfApi, RepoUrl

CACHE = pathlib.Path(sys.argv[1])


def _repo(repo_id):
    return CACHE / ("models--" + repo_id.replace("/", "--"))


def create_repo(self, repo_id, *, token=None, private=None, repo_type=None, exist_ok=False, **kwargs):
    (_repo(repo_id) / "refs").mkdir(parents=True, exist_ok=True)
    return RepoUrl(f"https://huggingface.co/{repo_id}")


def create_commit(self, repo_id, operations, *, commit_message, revision=None, **kwargs):
    repo, files = _repo(repo_id), {}
    ref = repo / "refs" / (revision or "main")
    if ref.is_file():  # the files of the previous commit stay
        previous = repo / "snapshots" / ref.read_text()
        files = {p.relative_to(previous).as_posix(): p.read_bytes() for p in previous.rglob("*") if p.is_file()}
    for op in operations:
        files[op.path_in_repo] = pathlib.Path(op.path_or_fileobj).read_bytes()
    sha = hashlib.sha1(b"".join(k.encode() + v for k, v in sorted(files.items()))).hexdigest()
    for name, data in files.items():
        (repo / "snapshots" / sha / name).parent.mkdir(parents=True, exist_ok=True)
        (repo / "snapshots" / sha / name).write_bytes(data)
    ref.write_text(sha)
    print("commit", repo_id, commit_message, sorted(op.path_in_repo for op in operations))


HfApi.create_repo, HfApi.create_commit = create_repo, create_commit
"""

PUSH = """
import torch, transformers as T
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file
import peft_gnnmoe

torch.manual_seed(0)
T.ViTForImageClassification(T.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
    intermediate_size=64, image_size=32, patch_size=8, num_labels=3)).push_to_hub("tiny-org/tiny-vit")
T.LlamaForCausalLM(T.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    num_attention_heads=2, num_key_value_heads=2, bos_token_id=1)).push_to_hub("tiny-org/tiny-llama")
vit = get_peft_model(T.ViTForImageClassification.from_pretrained("tiny-org/tiny-vit"),
    peft_gnnmoe.GNNMoEConfig(modules_to_save=["classifier"]))
llm = get_peft_model(T.LlamaForCausalLM.from_pretrained("tiny-org/tiny-llama"),
    peft_gnnmoe.SinkDecorrelationConfig(base_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"])))
lora = get_peft_model(T.LlamaForCausalLM.from_pretrained("tiny-org/tiny-llama"), LoraConfig(r=4))
for model in (vit, llm):  # non-zero adapters, so that loading them changes the outputs
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
vit.push_to_hub("tiny-org/gnnmoe-adapter")
llm.push_to_hub("tiny-org/sink-adapter")
llm.push_to_hub("tiny-org/sink-adapter", tags=["my-tag"])  # a second push: the repository has a card now
lora.push_to_hub("tiny-org/lora-adapter")
pixels, ids = torch.randn(2, 3, 32, 32), torch.tensor([[1, 5, 9, 12, 7]])
save_file({"pixels": pixels, "ids": ids, "gnnmoe": vit.eval()(pixel_values=pixels).logits.detach(),
    "sink": llm.eval()(input_ids=ids).logits.detach()}, "expected.safetensors")
"""

LOAD = """
import torch, transformers as T
from safetensors.torch import load_file
import peft_gnnmoe  # the loading snippet's first line
from peft import AutoPeftModelForCausalLM, PeftModel

expected = load_file("expected.safetensors")
vit = PeftModel.from_pretrained(T.ViTForImageClassification.from_pretrained("tiny-org/tiny-vit"),
    "tiny-org/gnnmoe-adapter").eval()
torch.testing.assert_close(vit(pixel_values=expected["pixels"]).logits, expected["gnnmoe"])
llm = PeftModel.from_pretrained(T.LlamaForCausalLM.from_pretrained("tiny-org/tiny-llama"), "tiny-org/sink-adapter")
torch.testing.assert_close(llm.eval()(input_ids=expected["ids"]).logits, expected["sink"])
auto = AutoPeftModelForCausalLM.from_pretrained("tiny-org/sink-adapter").eval()
torch.testing.assert_close(auto(input_ids=expected["ids"]).logits, expected["sink"])
print("loaded from the repositories: identical outputs")
"""


def _run(script: str, cache: Path, cwd: Path) -> str:
    # the subprocess imports the peft_gnnmoe under test, installed or not (cwd is a temporary folder)
    source = str(Path(peft_gnnmoe.__file__).resolve().parents[1])
    path = os.pathsep.join(p for p in (source, os.environ.get("PYTHONPATH")) if p)
    env = dict(os.environ, HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1", PYTHONPATH=path)
    done = subprocess.run([sys.executable, "-c", script, str(cache)], cwd=cwd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-4000:]
    return done.stdout


@pytest.fixture(scope="module")
def hub(tmp_path_factory) -> Path:
    """The local Hub after the pushes; the outputs to compare with are in its parent folder."""
    work = tmp_path_factory.mktemp("push")
    _run(FAKE_HUB + PUSH, work / "hub", work)
    return work / "hub"


def _repo_files(hub: Path, repo_id: str) -> dict[str, Path]:
    repo = hub / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / (repo / "refs" / "main").read_text()
    return {p.relative_to(snapshot).as_posix(): p for p in snapshot.rglob("*") if p.is_file()}


@pytest.mark.slow
@pytest.mark.parametrize("repo_id", ["tiny-org/gnnmoe-adapter", "tiny-org/sink-adapter"])
def test_the_repository_holds_what_save_pretrained_writes(hub, repo_id):
    assert sorted(_repo_files(hub, repo_id)) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("repo_id", "peft_type", "base"),
    [
        ("tiny-org/gnnmoe-adapter", "GNNMOE", "tiny-org/tiny-vit"),
        ("tiny-org/sink-adapter", "SINK_DECORRELATION", "tiny-org/tiny-llama"),
    ],
)
def test_the_pushed_card_is_the_peft_card_with_the_loading_snippet(hub, repo_id, peft_type, base):
    card = _repo_files(hub, repo_id)["README.md"].read_text()
    assert json.loads(_repo_files(hub, repo_id)["adapter_config.json"].read_text())["peft_type"] == peft_type
    assert "library_name: peft" in card
    assert f"base_model: {base}" in card
    assert card.count("import peft_gnnmoe  # registers") == 1
    assert f"from_pretrained('{base}')" in card


@pytest.mark.slow
def test_a_second_push_keeps_one_loading_section_and_adds_the_tags(hub):
    card = _repo_files(hub, "tiny-org/sink-adapter")["README.md"].read_text()
    assert card.count("<!-- peft-gnnmoe:usage -->") == 1
    assert "- my-tag" in card


@pytest.mark.slow
def test_other_adapter_types_push_as_before(hub):
    """A LoRA adapter gets transformers' card, untouched by peft_gnnmoe (which only keeps its own types' cards)."""
    card = _repo_files(hub, "tiny-org/lora-adapter")["README.md"].read_text()
    assert "library_name: transformers" in card
    assert "peft_gnnmoe" not in card


@pytest.mark.slow
def test_the_pushed_adapters_load_in_a_fresh_process(hub):
    assert "identical outputs" in _run(LOAD, hub, hub.parent)

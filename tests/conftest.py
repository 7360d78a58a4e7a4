"""Shared fixtures: tiny random-init transformers models built from configs (nothing is downloaded).

Factories are fixtures that return a function, so a test asks for ``make_vit`` (or ``make_lm``, ``sink_model``,
``lm_batch``) in its signature and calls it with the sizes it needs. Test modules never import each other.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest
import torch
import transformers as T
from peft import LoraConfig, get_peft_model

# ---- test tiers ----------------------------------------------------------------------------------------------------


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the xdist_group marks
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests that start several processes or load real weights are slow too: ``-m "not slow"`` leaves them out.

    Under pytest-xdist (``pytest.ini``: ``-n auto --dist loadgroup``) the tests that start several processes run one
    after the other on one worker: they share the default rendezvous port, and each already uses the cores.
    """
    for item in items:
        if item.get_closest_marker("distributed"):
            item.add_marker(pytest.mark.xdist_group("distributed"))
        if item.get_closest_marker("distributed") or item.get_closest_marker("real_weights"):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """Every test starts without accelerate's process-wide state. An ``Accelerator()`` made without
    ``mixed_precision`` takes an earlier one's: a docs page's TRL ``SFTTrainer`` (bf16 on CPUs) left bf16 autocast to
    every later test of its pytest-xdist worker, which ran the DG real tier's dry run 7x slower and broke the
    accumulation tests' 1e-5 tolerance."""
    yield
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state()  # the process group (PartialState) stays: tests that set one up tear it down
    GradientState._reset_state()


def pytest_configure(config: pytest.Config) -> None:
    """Each pytest-xdist worker gets its share of the cores for torch's intra-op threads (and the processes its
    tests start, through ``OMP_NUM_THREADS``): workers that each spun on every core would wait on one another."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        threads = max(1, (os.cpu_count() or 1) // workers)
        torch.set_num_threads(threads)
        os.environ.setdefault("OMP_NUM_THREADS", str(threads))


# ---- ViT family ----------------------------------------------------------------------------------------------------

# tiny ViT-family configs: 32x32 images, 8x8 patches -> a 4x4 patch grid
_TINY_VIT = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32, patch_size=8
)

# name: (config class, model class, expected special tokens in front of the 16 patches)
VIT_FAMILY = {
    "vit": (T.ViTConfig, T.ViTForImageClassification, 1),
    "deit": (T.DeiTConfig, T.DeiTForImageClassification, 2),
    "dinov2": (T.Dinov2Config, T.Dinov2ForImageClassification, 1),
    "dinov2_with_registers": (T.Dinov2WithRegistersConfig, T.Dinov2WithRegistersForImageClassification, 5),
    "beit": (T.BeitConfig, T.BeitForImageClassification, 1),
    "clip_vision": (T.CLIPVisionConfig, T.CLIPVisionModel, 1),
    "siglip_vision": (T.SiglipVisionConfig, T.SiglipVisionModel, 0),
}


def _make_vit_family(name: str, seed: int = 0, **overrides) -> torch.nn.Module:
    config_cls, model_cls, _ = VIT_FAMILY[name]
    kwargs = dict(_TINY_VIT, **overrides)
    if name == "dinov2_with_registers":
        kwargs.setdefault("num_register_tokens", 4)
    if model_cls.__name__.endswith("ForImageClassification"):
        kwargs.setdefault("num_labels", 3)
    torch.manual_seed(seed)
    return model_cls(config_cls(**kwargs)).eval()


def _make_vit(seed: int = 0, **overrides) -> torch.nn.Module:
    return _make_vit_family("vit", seed=seed, **overrides)


@pytest.fixture
def make_vit() -> Callable[..., torch.nn.Module]:
    """``make_vit(seed=0, **config_overrides)``: a tiny ``ViTForImageClassification`` (4x4 patches, 3 labels)."""
    return _make_vit


@pytest.fixture
def make_vit_family() -> Callable[..., torch.nn.Module]:
    """``make_vit_family(name, seed=0, **config_overrides)`` for a name of ``VIT_FAMILY``."""
    return _make_vit_family


@pytest.fixture(params=sorted(VIT_FAMILY))
def vit_family(request) -> tuple[str, int]:
    """Parametrises a test over the ViT family: ``(name, number of special tokens before the 16 patches)``."""
    return request.param, VIT_FAMILY[request.param][2]


@pytest.fixture
def images() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.fixture
def labels() -> torch.Tensor:
    return torch.tensor([0, 2])


# ---- causal LMs ----------------------------------------------------------------------------------------------------

VOCAB, BOS, EOS, PAD = 64, 1, 2, 0
_LM_TOKENS = dict(vocab_size=VOCAB, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD)
_DECODER = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2
)
LM_ARCHS = {
    "llama": (T.LlamaConfig, _DECODER),
    "qwen2": (T.Qwen2Config, _DECODER),
    "gemma": (T.GemmaConfig, dict(_DECODER, head_dim=8)),
    "gpt2": (T.GPT2Config, dict(n_embd=32, n_layer=3, n_head=4)),
}
LORA_TARGETS = {
    "llama": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"],
}


def _make_lm(arch: str = "llama", seed: int = 0, **overrides) -> torch.nn.Module:
    config_cls, sizes = LM_ARCHS[arch]
    torch.manual_seed(seed)
    return T.AutoModelForCausalLM.from_config(config_cls(**{**_LM_TOKENS, **sizes, **overrides}))


def _randomise_lora(model: torch.nn.Module, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)


def _sink_model(arch: str = "llama", seed: int = 0, **config_kwargs):
    from peft_gnnmoe import SinkDecorrelationConfig

    config_kwargs.setdefault("base_config", LoraConfig(r=4, target_modules=LORA_TARGETS[arch]))
    model = get_peft_model(_make_lm(arch, seed), SinkDecorrelationConfig(**config_kwargs))
    _randomise_lora(model, seed)
    return model.train()


def _lm_batch(seed: int = 0, lengths=(7, 5), pad_side: str = "right") -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    seq_len = max(lengths)
    ids = torch.full((len(lengths), seq_len), PAD)
    mask = torch.zeros_like(ids)
    for row, length in enumerate(lengths):
        tokens = torch.cat([torch.tensor([BOS]), torch.randint(3, VOCAB, (length - 1,), generator=generator)])
        span = slice(0, length) if pad_side == "right" else slice(seq_len - length, seq_len)
        ids[row, span], mask[row, span] = tokens, 1
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@pytest.fixture
def lm_tokens() -> dict[str, int]:
    """Token ids of the tiny LMs: ``vocab``, ``bos``, ``eos``, ``pad``."""
    return {"vocab": VOCAB, "bos": BOS, "eos": EOS, "pad": PAD}


@pytest.fixture
def make_lm() -> Callable[..., torch.nn.Module]:
    """``make_lm(arch="llama", seed=0, **config_overrides)``: a tiny random-init causal LM (3 layers, width 32);
    ``arch`` is one of llama, qwen2, gemma, gpt2."""
    return _make_lm


@pytest.fixture
def randomise_lora() -> Callable[..., None]:
    """``randomise_lora(model, seed=0)``: random ``lora_B`` so that LoRA is not a no-op."""
    return _randomise_lora


@pytest.fixture
def sink_model() -> Callable[..., torch.nn.Module]:
    """``sink_model(arch="llama", seed=0, **SinkDecorrelationConfig kwargs)``: a tiny LM with LoRA (random
    ``lora_B``) + sink decorrelation, in train mode."""
    return _sink_model


@pytest.fixture
def lm_batch() -> Callable[..., dict[str, torch.Tensor]]:
    """``lm_batch(seed=0, lengths=(7, 5), pad_side="right")``: BOS-first sequences padded to the longest; labels
    are the ids (-100 on padding)."""
    return _lm_batch

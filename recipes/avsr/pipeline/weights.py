"""What an AVSR run saves and reloads: the trainable weights only (safetensors), in checkpoints and in ``final/``.

``final/`` holds ``adapter/`` (the PEFT adapter, without the frozen embedding or LM head), ``projectors.safetensors``,
``added_tokens.safetensors`` (only the embedding rows of tokens added to the LLM's vocabulary, when any) and
``run.json`` (the modality and model configuration), so ``--eval_only --resume_from <run>/final`` rebuilds the model.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

import torch
from accelerate import Accelerator

from .config.model import ModelConfig

ADDED_TOKENS_FILE = "added_tokens.safetensors"
RUN_FILE = "run.json"


def trainable_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Projector and adapter weights only: what a checkpoint needs (the frozen encoders and LLM are on disk)."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def register_trainable_checkpointing(accelerator: Accelerator) -> None:
    """Make ``accelerator.save_state``/``load_state`` store only the trainable weights (safetensors)."""
    from safetensors.torch import load_file, save_file

    def save_hook(models, weights, output_dir):
        for i, model in enumerate(models):
            save_file(
                trainable_state_dict(accelerator.unwrap_model(model)),
                os.path.join(output_dir, f"trainable_{i}.safetensors"),
            )
        weights.clear()  # accelerate then writes no full model file

    def load_hook(models, input_dir):
        for i, model in enumerate(models):
            model = accelerator.unwrap_model(model)
            state = load_file(os.path.join(input_dir, f"trainable_{i}.safetensors"))
            expected = set(trainable_state_dict(model))
            if set(state) != expected:
                raise RuntimeError(
                    f"checkpoint {input_dir} does not match the model: differing keys "
                    f"{sorted(set(state) ^ expected)[:5]}"
                )
            model.load_state_dict(state, strict=False)
        models.clear()

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def _added_rows(model) -> dict[str, torch.Tensor]:
    """The embedding (and untied LM-head) rows of the tokens ``build_model`` added to the LLM's vocabulary."""
    rows = getattr(model, "added_token_rows", range(0))
    if not len(rows):
        return {}
    embed = model.llm.get_input_embeddings().weight
    out = {"embed_tokens": embed[rows.start : rows.stop].detach().clone()}
    head = model.llm.get_output_embeddings()
    if head is not None and head.weight is not embed:
        out["lm_head"] = head.weight[rows.start : rows.stop].detach().clone()
    return out


def save_final(model, final: str | os.PathLike, model_config: ModelConfig, modality: str) -> None:
    """Write a finished run's ``final/`` folder (see the module docstring); nothing of the frozen LLM's full size."""
    from safetensors.torch import save_file

    final = Path(final)
    model.llm.save_pretrained(final / "adapter", save_embedding_layers=False)
    save_file(model.projector_state_dict(), final / "projectors.safetensors")
    rows = _added_rows(model)
    if rows:
        save_file(rows, final / ADDED_TOKENS_FILE)
    (final / RUN_FILE).write_text(json.dumps({"modality": modality, "model": asdict(model_config)}, indent=1))


def read_run(final: str | os.PathLike) -> tuple[str, ModelConfig]:
    """The modality and model configuration a ``final/`` folder was trained with."""
    path = Path(final) / RUN_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{final} is not a finished run's final/ folder (no {RUN_FILE})")
    saved = json.loads(path.read_text())
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in saved["model"].items()}
    return saved["modality"], ModelConfig(**fields)


def load_final(model, final: str | os.PathLike) -> None:
    """Load a ``final/`` folder into a model built by ``build_model`` with the same configuration."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    final = Path(final)
    adapter = load_file(final / "adapter" / "adapter_model.safetensors")
    result = set_peft_model_state_dict(model.llm, adapter)
    if result.unexpected_keys:
        raise RuntimeError(f"{final}/adapter does not match the model: unexpected {result.unexpected_keys[:5]}")
    projectors = load_file(final / "projectors.safetensors")
    missing = set(model.projector_state_dict()) ^ set(projectors)
    if missing:
        raise RuntimeError(f"{final}/projectors.safetensors does not match the model: {sorted(missing)[:5]}")
    model.load_state_dict(projectors, strict=False)
    if (final / ADDED_TOKENS_FILE).is_file():
        saved = load_file(final / ADDED_TOKENS_FILE)
        rows = model.added_token_rows
        with torch.no_grad():
            model.llm.get_input_embeddings().weight[rows.start : rows.stop] = saved["embed_tokens"]
            if "lm_head" in saved:
                model.llm.get_output_embeddings().weight[rows.start : rows.stop] = saved["lm_head"]

"""The one place where a command line becomes a :class:`~.run.RunConfig`: presets, flags, data-source defaults.

Layers, each over the one before: the groups' field defaults (LRS3 and Llama-AVSR's values); the ``embedded``
preset when there is no ``--data_dir``; the presets named by ``--real`` / ``--preset``, in order; an experiment's own
defaults; the flags given on the command line, which always win. Then the defaults that depend on the data source.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ...data.loader import LoaderConfig
from ..stand_ins import stand_in_paths
from .data import CORPUS_SHAPING, DataConfig
from .evaluation import EvalConfig
from .fields import group_values, option_fields
from .model import ModelConfig
from .presets import load_preset
from .run import RunConfig
from .train import TrainConfig

GROUPS = {"data": DataConfig, "loader": LoaderConfig, "model": ModelConfig, "train": TrainConfig, "eval": EvalConfig}
CHECKPOINTS = ("llm", "audio_encoder", "video_encoder")


def option_names() -> set[str]:
    """The destinations of every option of the run configuration."""
    return {f.name for group in (RunConfig, *GROUPS.values()) for f in option_fields(group)}


def presets_of(values: dict[str, Any]) -> list[str]:
    """The presets a command line applies, in order: ``embedded`` without ``--data_dir``, then ``--real`` /
    ``--preset``."""
    source = ["embedded"] if values.get("data_dir") is None else []
    return source + (["real"] if values.get("real") else []) + list(values.get("preset") or [])


def layered_values(
    values: dict[str, Any], given: set[str], experiment_defaults: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The option values of a command line: presets, then ``experiment_defaults``, then the flags ``given``."""
    names = option_names()
    layered: dict[str, Any] = {}
    for preset in presets_of(values):
        layered.update(load_preset(preset, names))
    layered.update(experiment_defaults or {})
    layered.update({k: values[k] for k in given if k in names})
    return layered


def resolve_config(
    values: dict[str, Any], given: set[str], experiment: str = "none", experiment_defaults: dict | None = None
) -> RunConfig:
    """The frozen run configuration of parsed option ``values``, of which the command line gave ``given``.

    Without ``--data_dir`` the run uses the embedded corpus (``output_dir/corpus``) and stand-in models
    (``output_dir/base_models``, see :mod:`recipes.avsr.pipeline.stand_ins`) unless a checkpoint is named.
    """
    embedded = values.get("data_dir") is None
    if not embedded and given & set(CORPUS_SHAPING):
        raise ValueError(
            "--corpus_text, --corpus_vocab and --held_out_speakers shape the embedded corpus; with --data_dir, drop "
            "them"
        )
    layered = layered_values(values, given, experiment_defaults)
    if "real_speech_test" in given and values["real_speech_test"] and "asr" not in layered.get("modalities", ("asr",)):
        raise ValueError("--real_speech_test decodes recorded speech without video: it needs --modality asr")
    own = group_values(RunConfig, {k: v for k, v in layered.items() if k not in GROUPS})
    data = DataConfig(**group_values(DataConfig, layered))
    loader = _loader(layered, given, embedded)
    model = _model(layered, loader, data, own.get("modalities", RunConfig.modalities), own.get("output_dir"))
    groups = {"data": data, "loader": loader, "model": model}
    groups |= {name: cls(**group_values(cls, layered)) for name, cls in GROUPS.items() if name not in groups}
    return RunConfig(**own, **groups, experiment=experiment)


def _loader(layered: dict[str, Any], given: set[str], embedded: bool) -> LoaderConfig:
    values = group_values(LoaderConfig, layered)
    if values.get("random_crop") is None:
        values["random_crop"] = not embedded  # real data: random crops; the embedded corpus: centre crops
    noisy_test = bool(layered.get("test_snrs")) or values.get("test_snr_db") is not None
    if "test_noise" not in given and not noisy_test:
        values.pop("test_noise", None)  # a preset's test noise applies to noisy test sets only
    return LoaderConfig(**values, reference_budget=not embedded)


def _model(
    layered: dict[str, Any], loader: LoaderConfig, data: DataConfig, modalities, output_dir: Path | None
) -> ModelConfig:
    values = group_values(ModelConfig, layered)
    if data.embedded and data.corpus_text == "open" and values.get("llm") is None:
        raise ValueError(
            "--corpus_text open has thousands of words, and many test words never occur in training; the embedded "
            "stand-in LLM's word-level tokenizer knows the training words only: pass --real or --llm <pretrained LLM>"
        )
    if values.get("cache_features") is None:
        values["cache_features"] = data.embedded and not loader.augmenting
    used = models_used(modalities)
    if data.embedded:
        stand_ins = stand_in_paths(Path(output_dir or RunConfig.output_dir))
        values |= {m: str(stand_ins[m]) for m in CHECKPOINTS if values.get(m) is None}
    elif missing := [f"--{m}" for m in used if values.get(m) is None]:
        raise SystemExit(
            f"with --data_dir, pass {', '.join(missing)} (the embedded models exist only for the embedded corpus; "
            "e.g. --llm meta-llama/Llama-3.2-1B --audio_encoder openai/whisper-medium)"
        )
    return ModelConfig(**values)


def models_used(modalities) -> list[str]:
    """The checkpoints runs of ``modalities`` load: the LLM, and the audio and / or video encoder."""
    used = ["llm"]
    if {"asr", "avsr"} & set(modalities):
        used.append("audio_encoder")
    if {"vsr", "avsr"} & set(modalities):
        used.append("video_encoder")
    return used

"""The model group: checkpoints, projectors, LoRA and sink decorrelation (what ``build_model`` builds)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from ..alignment import check_ctc_weight
from .fields import option

DTYPES = ("fp32", "bf16", "fp16")


@dataclass(frozen=True)
class ModelConfig:
    """Model: frozen encoders and LLM, projectors, LoRA, sink decorrelation (saved with every run in ``run.json``)."""

    llm: str | None = option(None, "causal LM id or path (default: an embedded small Llama; the real preset: smollm2)")
    audio_encoder: str | None = option(
        None, "Whisper id or path (default: an embedded small Whisper; the real preset: whisper-tiny.en)"
    )
    video_encoder: str | None = option(
        None, "saved LipEncoderModel dir or transformers image model (default: an embedded LipEncoder)"
    )
    audio_rate: int = option(4, "audio frames (50 Hz) per LLM token")
    video_rate: int = option(2, "video frames (25 fps) per LLM token")
    projector: str = option(
        "stack",
        "compress by stacking K frames (Llama-AVSR) or average-pooling them (the sink paper; the experiments)",
        choices=("stack", "avg"),
    )
    projector_hidden: int = option(2048, "projector MLP width (the embedded preset: 512)", advanced=True)
    projector_layer_norm: bool = option(False, "LayerNorm in the projector", advanced=True)
    ctc_weight: float = option(
        0.0,
        "weight of an auxiliary CTC loss that scores each projected audio token against the LLM's embedding matrix "
        "and asks the tokens to spell the transcript (recipes/avsr/pipeline/alignment.py). Training only; 0 = off",
        advanced=True,
    )
    llm_dtype: str = option(
        "fp32",
        "dtype of the frozen LLM's weights (bf16 as Llama-AVSR trains; the projectors and LoRA stay fp32; the real "
        "preset: bf16)",
        choices=DTYPES,
    )
    audio_encoder_dtype: str = option(
        "fp32",
        "dtype of the frozen audio encoder's weights (its output goes to the projector in fp32; the real preset: "
        "bf16)",
        advanced=True,
        choices=("fp32", "bf16"),
    )
    audio_window: int | None = option(
        None,
        "seconds of audio the Whisper encoder sees, its positional table cut to match (whisper.cpp's audio_ctx); "
        "default: the checkpoint's 30 s, 8 s in the real preset. Longer audio is skipped and counted",
        advanced=True,
        type=int,
    )
    cache_features: bool | None = option(
        None,
        "keep each utterance's frozen-encoder output in memory (default: on for the embedded corpus without "
        "augmentation)",
        advanced=True,
        action=argparse.BooleanOptionalAction,
    )
    lora_r: int = option(8, "LoRA rank (the llama_avsr preset: 64)")
    lora_alpha: int = option(16, "LoRA alpha (the llama_avsr preset: 8)", advanced=True)
    lora_dropout: float = option(0.05, "LoRA dropout (the llama_avsr preset: 0)", advanced=True)
    lora_targets: tuple[str, ...] = option(("q_proj", "v_proj"), "LoRA target modules", advanced=True, nargs="+")
    decor_weight: float = option(0.0, "lambda of the sink decorrelation loss (0 = off)")
    decor_tokens: str = option("prefix", "tokens decorrelated", advanced=True, choices=("all", "prefix"))
    decor_layers: str | tuple[int, ...] = option(
        "all_but_last", "'all', 'all_but_last' or comma-separated indices", advanced=True
    )
    decor_form: str = option("squared", "form of the decorrelation loss", advanced=True, choices=("squared", "abs"))

    def __post_init__(self):
        check_ctc_weight(self.ctc_weight)
        if isinstance(self.decor_layers, str) and self.decor_layers not in ("all", "all_but_last"):
            object.__setattr__(self, "decor_layers", tuple(int(i) for i in self.decor_layers.split(",")))
        elif isinstance(self.decor_layers, list):
            object.__setattr__(self, "decor_layers", tuple(self.decor_layers))
        object.__setattr__(self, "lora_targets", tuple(self.lora_targets))

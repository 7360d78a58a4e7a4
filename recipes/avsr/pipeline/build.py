"""Build the model of one AVSR run: encoders, the LLM with its delimiter tokens, PEFT (LoRA, sink decorrelation)."""

from __future__ import annotations

import torch

from .audio_encoder import load_audio_encoder
from .config.model import ModelConfig
from .lip_encoder import load_video_encoder
from .model import AVSRModel
from .sequences import prepare_tokenizer

LLM_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def peft_config(config: ModelConfig):
    """LoRA on the LLM, wrapped by sink decorrelation when ``config.decor_weight > 0``."""
    from peft import LoraConfig

    lora = LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=list(config.lora_targets),
        task_type="CAUSAL_LM",
    )
    if config.decor_weight <= 0:
        return lora
    from peft_gnnmoe.tuners.sink_decorrelation import SinkDecorrelationConfig

    layers = config.decor_layers if isinstance(config.decor_layers, str) else list(config.decor_layers)
    # BOS is the first valid position of every right-padded sequence; 'prefix' = tokens with label -100
    return SinkDecorrelationConfig(
        base_config=lora,
        weight=config.decor_weight,
        layers=layers,
        tokens=config.decor_tokens,
        form=config.decor_form,
        bos="first",
        task_type="CAUSAL_LM",
    )


def build_model(config: ModelConfig, modality: str) -> tuple[AVSRModel, object]:
    """Load encoders and LLM, add the delimiters, wrap the LLM with PEFT, and assemble the AVSR model.

    Returns the model and the audio feature extractor (None without audio).
    """
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from recipes.common.pretrained.smollm2 import resolve_llm

    llm_path = resolve_llm(config.llm)  # the preset "smollm2" -> its converted folder; ids and folders unchanged
    tokenizer = AutoTokenizer.from_pretrained(llm_path)
    prepare_tokenizer(tokenizer)
    llm = AutoModelForCausalLM.from_pretrained(llm_path, dtype=LLM_DTYPES[config.llm_dtype])
    n_rows = llm.get_input_embeddings().num_embeddings
    if len(tokenizer) > n_rows:  # never shrink a vocabulary padded beyond the tokenizer's
        llm.resize_token_embeddings(len(tokenizer))
    llm.config.pad_token_id = tokenizer.pad_token_id
    llm = get_peft_model(llm, peft_config(config))
    audio_encoder = extractor = video_encoder = None
    if modality in ("asr", "avsr"):
        audio_encoder, extractor = load_audio_encoder(config.audio_encoder, config.audio_window)
        audio_encoder.to(LLM_DTYPES[config.audio_encoder_dtype])
    if modality in ("vsr", "avsr"):
        video_encoder = load_video_encoder(config.video_encoder)
    model = AVSRModel(
        llm,
        tokenizer,
        modality,
        audio_encoder,
        video_encoder,
        config.audio_rate,
        config.video_rate,
        config.projector,
        config.projector_hidden,
        config.projector_layer_norm,
        config.ctc_weight,
    )
    model.added_token_rows = range(n_rows, llm.get_input_embeddings().num_embeddings)  # saved with the run
    model.enable_feature_cache(config.cache_features)
    return model, extractor

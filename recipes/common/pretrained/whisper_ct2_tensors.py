"""CTranslate2 Whisper variables -> transformers ``WhisperForConditionalGeneration`` tensor names, every one by name.

CTranslate2's Whisper converter (``ctranslate2/converters/transformers.py``, ``WhisperLoader`` on ``BartLoader``)
fuses q/k/v (self-attention) and k/v (cross-attention) into one linear and fills Whisper's missing key bias with zeros;
this inverts it. Any variable that is missing, left unused or mis-shaped raises.
"""

from __future__ import annotations

import torch

from .ct2_format import CT2Model

WHISPER_SPEC_NAME = "WhisperSpec"
_CT2_GELU = 3  # ctranslate2.specs.common_spec.Activation.GELU (exact erf GELU, transformers' "gelu")


class _Consumer:
    """Hands out CTranslate2 variables by name exactly once; ``finish`` fails on any variable left unused."""

    def __init__(self, model: CT2Model):
        self.remaining = dict(model.variables)
        self.source = model

    def take(self, name: str, shape: tuple[int, ...] | None = None) -> torch.Tensor:
        if name not in self.remaining:
            state = "used twice" if name in self.source.variables else "missing"
            raise KeyError(f"CTranslate2 Whisper variable {name!r} is {state}; is this a Whisper model?")
        tensor = self.remaining.pop(name)
        if shape is not None and tuple(tensor.shape) != tuple(shape):
            raise ValueError(f"CTranslate2 variable {name!r} has shape {tuple(tensor.shape)}, expected {shape}.")
        return tensor

    def scalar(self, name: str, expected: int | None = None) -> int:
        value = int(self.take(name, ()).item())
        if expected is not None and value != expected:
            raise ValueError(
                f"CTranslate2 variable {name!r} is {value}; only {expected} maps onto transformers Whisper."
            )
        return value

    def finish(self) -> None:
        if self.remaining:
            raise ValueError(f"CTranslate2 variables not mapped onto transformers Whisper: {sorted(self.remaining)}")


def _float(tensor: torch.Tensor, name: str) -> torch.Tensor:
    if not tensor.is_floating_point():
        raise ValueError(f"{name} is {tensor.dtype}: quantized CTranslate2 models are not supported, use a float one.")
    return tensor.to(torch.float32).contiguous()


def _split_rows(tensor: torch.Tensor, parts: int, name: str) -> list[torch.Tensor]:
    if tensor.shape[0] % parts:
        raise ValueError(f"{name} has {tensor.shape[0]} rows, not divisible into {parts} fused projections.")
    return list(tensor.chunk(parts, dim=0))


def _map_linear(take: _Consumer, ct2: str, hf: str, out: dict[str, torch.Tensor], d_in: int) -> None:
    weight = take.take(f"{ct2}/weight")
    if weight.ndim != 2 or weight.shape[1] != d_in:
        raise ValueError(f"{ct2}/weight has shape {tuple(weight.shape)}, expected [*, {d_in}].")
    out[f"{hf}.weight"] = _float(weight, ct2)
    out[f"{hf}.bias"] = _float(take.take(f"{ct2}/bias", (weight.shape[0],)), ct2)


def _map_layer_norm(take: _Consumer, ct2: str, hf: str, out: dict[str, torch.Tensor], d_model: int) -> None:
    out[f"{hf}.weight"] = _float(take.take(f"{ct2}/gamma", (d_model,)), ct2)
    out[f"{hf}.bias"] = _float(take.take(f"{ct2}/beta", (d_model,)), ct2)


def _map_fused(
    take: _Consumer, ct2: str, hf: str, names: tuple[str, ...], out: dict[str, torch.Tensor], d_model: int
) -> None:
    """Split a fused projection into q/k/v; Whisper's k_proj has no bias (CTranslate2 stores zeros there)."""
    weight = _float(take.take(f"{ct2}/weight", (d_model * len(names), d_model)), ct2)
    bias = _float(take.take(f"{ct2}/bias", (d_model * len(names),)), ct2)
    for name, w, b in zip(names, _split_rows(weight, len(names), ct2), _split_rows(bias, len(names), ct2)):
        out[f"{hf}.{name}.weight"] = w.contiguous()
        if name == "k_proj":
            if torch.count_nonzero(b):
                raise ValueError(f"{ct2}/bias has a non-zero key bias; transformers' Whisper k_proj has no bias.")
        else:
            out[f"{hf}.{name}.bias"] = b.contiguous()


def _map_attention(take: _Consumer, ct2: str, hf: str, out: dict, d_model: int, cross: bool) -> None:
    if cross:
        _map_fused(take, f"{ct2}/linear_0", hf, ("q_proj",), out, d_model)
        _map_fused(take, f"{ct2}/linear_1", hf, ("k_proj", "v_proj"), out, d_model)
        _map_linear(take, f"{ct2}/linear_2", f"{hf}.out_proj", out, d_model)
    else:
        _map_fused(take, f"{ct2}/linear_0", hf, ("q_proj", "k_proj", "v_proj"), out, d_model)
        _map_linear(take, f"{ct2}/linear_1", f"{hf}.out_proj", out, d_model)


def _layer_count(model: CT2Model, prefix: str) -> int:
    count = 0
    while f"{prefix}/layer_{count}/ffn/linear_0/weight" in model.variables:
        count += 1
    if count == 0:
        raise ValueError(f"CTranslate2 model has no {prefix} layers.")
    return count


def map_whisper_tensors(model: CT2Model) -> tuple[dict[str, torch.Tensor], dict]:
    """Map every CTranslate2 Whisper variable onto transformers' names; returns (state dict, config kwargs)."""
    if model.spec_name != WHISPER_SPEC_NAME:
        raise ValueError(f"CTranslate2 model is a {model.spec_name}, not a {WHISPER_SPEC_NAME}.")
    take, out = _Consumer(model), {}
    conv1 = take.take("encoder/conv1/weight")
    d_model, num_mel_bins = conv1.shape[0], conv1.shape[1]
    out["model.encoder.conv1.weight"] = _float(conv1, "encoder/conv1")
    out["model.encoder.conv1.bias"] = _float(take.take("encoder/conv1/bias", (d_model,)), "encoder/conv1")
    out["model.encoder.conv2.weight"] = _float(take.take("encoder/conv2/weight", (d_model, d_model, 3)), "conv2")
    out["model.encoder.conv2.bias"] = _float(take.take("encoder/conv2/bias", (d_model,)), "encoder/conv2")
    source_positions = take.take("encoder/position_encodings/encodings")
    out["model.encoder.embed_positions.weight"] = _float(source_positions, "encoder/position_encodings")
    _map_layer_norm(take, "encoder/layer_norm", "model.encoder.layer_norm", out, d_model)
    encoder_layers, decoder_layers = _layer_count(model, "encoder"), _layer_count(model, "decoder")
    ffn_dim = model.variables["encoder/layer_0/ffn/linear_0/weight"].shape[0]
    for i in range(encoder_layers):
        ct2, hf = f"encoder/layer_{i}", f"model.encoder.layers.{i}"
        _map_attention(take, f"{ct2}/self_attention", f"{hf}.self_attn", out, d_model, cross=False)
        _map_layer_norm(take, f"{ct2}/self_attention/layer_norm", f"{hf}.self_attn_layer_norm", out, d_model)
        _map_ffn(take, ct2, hf, out, d_model)
    embeddings = take.take("decoder/embeddings/weight")
    vocab_size = embeddings.shape[0]
    out["model.decoder.embed_tokens.weight"] = _float(embeddings, "decoder/embeddings")
    target_positions = take.take("decoder/position_encodings/encodings")
    out["model.decoder.embed_positions.weight"] = _float(target_positions, "decoder/position_encodings")
    _map_layer_norm(take, "decoder/layer_norm", "model.decoder.layer_norm", out, d_model)
    for i in range(decoder_layers):
        ct2, hf = f"decoder/layer_{i}", f"model.decoder.layers.{i}"
        _map_attention(take, f"{ct2}/self_attention", f"{hf}.self_attn", out, d_model, cross=False)
        _map_layer_norm(take, f"{ct2}/self_attention/layer_norm", f"{hf}.self_attn_layer_norm", out, d_model)
        _map_attention(take, f"{ct2}/attention", f"{hf}.encoder_attn", out, d_model, cross=True)
        _map_layer_norm(take, f"{ct2}/attention/layer_norm", f"{hf}.encoder_attn_layer_norm", out, d_model)
        _map_ffn(take, ct2, hf, out, d_model)
    tied = _map_projection(model, take, out, vocab_size, d_model)
    config = {
        "vocab_size": vocab_size,
        "num_mel_bins": num_mel_bins,
        "d_model": d_model,
        "encoder_layers": encoder_layers,
        "decoder_layers": decoder_layers,
        "encoder_attention_heads": take.scalar("encoder/num_heads"),
        "decoder_attention_heads": take.scalar("decoder/num_heads"),
        "encoder_ffn_dim": ffn_dim,
        "decoder_ffn_dim": model.variables["decoder/layer_0/ffn/linear_0/weight"].shape[0],
        "max_source_positions": source_positions.shape[0],
        "max_target_positions": target_positions.shape[0],
        "activation_function": "gelu",
        "scale_embedding": False,
        "tie_word_embeddings": tied,
    }
    # Decoder flags: only the values transformers' Whisper implements are accepted.
    take.scalar("decoder/activation", _CT2_GELU)
    take.scalar("decoder/pre_norm", 1)
    take.scalar("decoder/scale_embeddings", 0)
    take.scalar("decoder/alibi", 0)
    for flag in ("decoder/alibi_use_positive_positions", "decoder/scale_alibi"):  # newer writers; inert without ALiBi
        if flag in take.remaining:
            take.scalar(flag)
    take.scalar("decoder/start_from_zero_embedding", 0)
    # Used by CTranslate2 only for word timestamps (transformers reads alignment heads from generation_config.json).
    take.scalar("decoder/alignment_heads")
    take.scalar("decoder/alignment_layer")
    take.finish()
    return out, config


def _map_ffn(take: _Consumer, ct2: str, hf: str, out: dict, d_model: int) -> None:
    _map_linear(take, f"{ct2}/ffn/linear_0", f"{hf}.fc1", out, d_model)
    ffn_dim = out[f"{hf}.fc1.weight"].shape[0]
    _map_linear(take, f"{ct2}/ffn/linear_1", f"{hf}.fc2", out, ffn_dim)
    _map_layer_norm(take, f"{ct2}/ffn/layer_norm", f"{hf}.final_layer_norm", out, d_model)


def _map_projection(model: CT2Model, take: _Consumer, out: dict, vocab_size: int, d_model: int) -> bool:
    """The output projection: tied (an alias of the token embedding) or a separate bias-free weight."""
    aliases = dict(model.aliases)
    target = aliases.pop("decoder/projection/weight", None)
    if aliases:
        raise ValueError(f"CTranslate2 aliases not mapped onto transformers Whisper: {aliases}")
    if target is not None:
        if target != "decoder/embeddings/weight":
            raise ValueError(f"decoder/projection/weight aliases {target!r}, expected the decoder embeddings.")
        return True
    weight = take.take("decoder/projection/weight", (vocab_size, d_model))
    if "decoder/projection/bias" in take.remaining:
        raise ValueError("decoder/projection/bias exists; transformers' Whisper proj_out has no bias.")
    out["proj_out.weight"] = _float(weight, "decoder/projection")
    return False

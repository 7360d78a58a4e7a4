"""The frozen audio encoder: the encoder of a Whisper checkpoint, optionally on a window shorter than 30 s."""

from __future__ import annotations

from torch import nn


def load_audio_encoder(name_or_path: str, window: int | None = None) -> tuple[nn.Module, object]:
    """The encoder of a Whisper checkpoint (full model or encoder-only save) and its feature extractor.

    ``"whisper-tiny.en"`` is the bundled tiny.en (converted from CTranslate2 on first use); a CTranslate2 folder
    raises a ``ValueError`` naming the conversion command. ``window`` (whole seconds) runs the encoder on a shorter
    input than its checkpoint's (Whisper: 30 s), see :func:`shorten_audio_window`.
    """
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperModel
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    from recipes.common.pretrained.whisper_ct2 import resolve_whisper

    name_or_path = resolve_whisper(name_or_path)
    config = WhisperConfig.from_pretrained(name_or_path)
    if "WhisperEncoder" in (config.architectures or []):
        encoder = WhisperEncoder.from_pretrained(name_or_path)
    else:
        encoder = WhisperModel.from_pretrained(name_or_path).encoder
    extractor = WhisperFeatureExtractor.from_pretrained(name_or_path)
    if window is not None:
        encoder, extractor = shorten_audio_window(encoder, extractor, window)
    return encoder, extractor


def shorten_audio_window(encoder: nn.Module, extractor, seconds: int) -> tuple[nn.Module, object]:
    """A Whisper encoder and feature extractor for inputs of ``seconds`` instead of the checkpoint's window.

    The encoder keeps the first ``seconds * 50`` rows of its positional table (what whisper.cpp's ``audio_ctx``
    does): every frame keeps its position, and attention spans the shorter padded input. Its outputs are not those of
    the 30 s input (the padding frames differ), so this changes the features; the cost falls about in proportion.
    Audio longer than the window is skipped and counted by the loader, never cut.
    """
    from transformers import WhisperFeatureExtractor

    conv_stride = encoder.conv1.stride[0] * encoder.conv2.stride[0]
    positions = seconds * extractor.sampling_rate // (extractor.hop_length * conv_stride)
    longest = encoder.embed_positions.num_embeddings * conv_stride * extractor.hop_length // extractor.sampling_rate
    if not 0 < positions <= encoder.embed_positions.num_embeddings:
        raise ValueError(f"--audio_window {seconds} must be in [1, {longest}] s (the checkpoint's window)")
    table = encoder.embed_positions.weight.detach()[:positions].clone()
    encoder.embed_positions = nn.Embedding.from_pretrained(table, freeze=True)
    encoder.config.max_source_positions = positions
    shorter = WhisperFeatureExtractor(
        feature_size=extractor.feature_size,
        sampling_rate=extractor.sampling_rate,
        hop_length=extractor.hop_length,
        chunk_length=seconds,
        n_fft=extractor.n_fft,
        padding_value=extractor.padding_value,
    )
    return encoder, shorter

"""The AVSR model of the recipe, in the Llama-AVSR style (Cappellazzo et al., "Large Language Models are Strong
Audio-Visual Speech Recognition Learners", ICASSP 2025, arXiv 2409.12319; code: umbertocappellazzo/Llama-AVSR).

Frozen audio encoder (a transformers Whisper encoder) and frozen video encoder (lip frames, see
:mod:`recipes.avsr.lip_encoder`) → per-modality projector that compresses time by a rate K (stack K frames or average
them) → token sequence

    [BOS, <audio>, A…, </audio>, <video>, V…, </video>, prompt, transcript, EOS]

fed as ``inputs_embeds`` to a frozen causal LM adapted with LoRA (optionally wrapped by sink decorrelation). Only the
transcript and EOS are scored.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from transformers.utils import ModelOutput

from .alignment import EmbeddingCTCHead
from .lip_encoder import video_hidden_size

PROMPTS = {
    "asr": "Transcribe speech to text.",
    "vsr": "Transcribe video to text.",
    "avsr": "Transcribe speech and video to text.",
}
MODALITY_TOKENS = ["<audio>", "</audio>", "<video>", "</video>"]
IGNORE_INDEX = -100

# what each position of an assembled sequence is (SequenceBatch.segments)
SEGMENTS = ("pad", "bos", "audio_delim", "audio", "video_delim", "video", "prompt", "transcript", "eos")
SEG = {name: i for i, name in enumerate(SEGMENTS)}


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


class ModalityProjector(nn.Module):
    """Compresses encoder frames by ``rate`` and maps them to the LLM width (Llama-AVSR's projector).

    ``mode="stack"`` concatenates ``rate`` consecutive frames (``[B, T, D] → [B, ⌈T/rate⌉, rate·D]``);
    ``mode="avg"`` averages them (AvgPool1d, as in the sink paper). Padding frames never enter a valid token: each
    utterance gives ``⌈length/rate⌉`` tokens. Then ``Linear → ReLU → Linear`` (optionally LayerNorm).
    """

    def __init__(
        self, in_dim: int, out_dim: int, rate: int, mode: str = "stack", hidden: int = 2048, layer_norm: bool = False
    ):
        super().__init__()
        if rate < 1:
            raise ValueError(f"downsampling rate must be >= 1, got {rate}")
        if mode not in ("stack", "avg"):
            raise ValueError(f"projector mode must be 'stack' or 'avg', got {mode!r}")
        self.rate, self.mode = rate, mode
        width = in_dim * rate if mode == "stack" else in_dim
        layers: list[nn.Module] = [nn.Linear(width, hidden), nn.ReLU(), nn.Linear(hidden, out_dim)]
        if layer_norm:
            layers.append(nn.LayerNorm(out_dim))
        self.mlp = nn.Sequential(*layers)

    def downsample(self, feats: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[B, T, D]`` frames and valid lengths → compressed ``[B, T', D']`` and new lengths (no MLP)."""
        b, t, d = feats.shape
        k = self.rate
        t_out = math.ceil(t / k)
        valid = (torch.arange(t_out * k, device=feats.device)[None] < lengths[:, None].to(feats.device)).to(
            feats.dtype
        )
        feats = nn.functional.pad(feats, (0, 0, 0, t_out * k - t)) * valid[..., None]  # zero the padding
        groups = feats.view(b, t_out, k, d)  # B, T', K, D
        if self.mode == "stack":
            out = groups.reshape(b, t_out, k * d)
        else:
            out = groups.sum(2) / valid.view(b, t_out, k).sum(2, keepdim=True).clamp(min=1)
        return out, torch.div(lengths + k - 1, k, rounding_mode="floor")

    def forward(self, feats: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out, new_lengths = self.downsample(feats, lengths)
        return self.mlp(out), new_lengths


def prepare_tokenizer(tokenizer) -> int:
    """Add the modality delimiters (and a pad token) to an LLM's tokenizer; returns how many tokens were added."""
    added = tokenizer.add_special_tokens({"additional_special_tokens": MODALITY_TOKENS})
    if tokenizer.pad_token is None:
        added += tokenizer.add_special_tokens({"pad_token": "<pad>"})
    if tokenizer.bos_token_id is None or tokenizer.eos_token_id is None:
        raise ValueError(
            "the LLM's tokenizer needs a BOS and an EOS token (the sequence starts with BOS, ends with EOS)"
        )
    return added


@dataclass
class SequenceBatch:
    """An assembled batch: ``inputs_embeds [B, L, d]``, ``attention_mask [B, L]``, ``labels [B, L]`` (or None) and
    ``segments [B, L]`` (indices into :data:`SEGMENTS`, telling what each position is)."""

    inputs_embeds: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor | None
    segments: torch.Tensor


def assemble_sequences(
    embed: nn.Module,
    ids: dict[str, int],
    prompt_ids: list[int],
    audio: tuple[torch.Tensor, torch.Tensor] | None,
    video: tuple[torch.Tensor, torch.Tensor] | None,
    transcripts: list[list[int]] | None,
    pad_left: bool = False,
) -> SequenceBatch:
    """Lay out ``[BOS, <audio>, A…, </audio>, <video>, V…, </video>, prompt, transcript, EOS]`` per utterance.

    Args:
        embed: the LLM's input embedding.
        ids: token ids of ``bos``, ``eos``, ``pad`` and the four modality delimiters (by their text).
        prompt_ids: the instruction's token ids.
        audio, video: ``(tokens [B, T, d], lengths [B])`` from the projectors, or None for an absent modality.
        transcripts: token ids of each transcript (training: appended with EOS and scored), or None (decoding).
        pad_left: pad on the left (for ``generate``) instead of the right.

    Labels are ``-100`` everywhere except the transcript tokens and EOS.
    """
    device, dtype = embed.weight.device, embed.weight.dtype
    b = (audio or video)[0].shape[0]
    # the projectors' outputs join the LLM's own embeddings: its device and dtype (a bf16 LLM gets bf16 inputs)
    audio = None if audio is None else (audio[0].to(device=device, dtype=dtype), audio[1])
    video = None if video is None else (video[0].to(device=device, dtype=dtype), video[1])

    def tok(token_ids: list[int]) -> torch.Tensor:
        return embed(torch.tensor(token_ids, device=device, dtype=torch.long))

    rows, seg_rows, label_rows = [], [], []
    prompt = tok(prompt_ids)
    for i in range(b):
        parts = [(tok([ids["bos"]]), SEG["bos"])]
        for feats, open_tok, close_tok, name in (
            (audio, "<audio>", "</audio>", "audio"),
            (video, "<video>", "</video>", "video"),
        ):
            if feats is not None:
                parts += [
                    (tok([ids[open_tok]]), SEG[f"{name}_delim"]),
                    (feats[0][i, : int(feats[1][i])], SEG[name]),
                    (tok([ids[close_tok]]), SEG[f"{name}_delim"]),
                ]
        parts.append((prompt, SEG["prompt"]))
        if transcripts is not None:
            parts += [(tok(transcripts[i]), SEG["transcript"]), (tok([ids["eos"]]), SEG["eos"])]
        rows.append(torch.cat([p for p, _ in parts]))
        seg_rows.append(torch.cat([torch.full((len(p),), s, dtype=torch.long, device=device) for p, s in parts]))
        if transcripts is not None:
            n_prefix = sum(len(p) for p, s in parts if s not in (SEG["transcript"], SEG["eos"]))
            label_rows.append(torch.tensor([IGNORE_INDEX] * n_prefix + transcripts[i] + [ids["eos"]], device=device))
    longest = max(len(r) for r in rows)
    d = rows[0].shape[-1]
    embeds = rows[0].new_zeros(b, longest, d)
    mask = torch.zeros(b, longest, dtype=torch.long, device=device)
    segments = torch.full((b, longest), SEG["pad"], dtype=torch.long, device=device)
    labels = (
        torch.full((b, longest), IGNORE_INDEX, dtype=torch.long, device=device) if transcripts is not None else None
    )
    for i, row in enumerate(rows):
        n = len(row)
        sl = slice(longest - n, longest) if pad_left else slice(0, n)
        embeds[i, sl], mask[i, sl], segments[i, sl] = row, 1, seg_rows[i]
        if labels is not None:
            labels[i, sl] = label_rows[i]
    return SequenceBatch(embeds, mask, labels, segments)


@dataclass
class AVSROutput(ModelOutput):
    """The AVSR model's training output: the loss and, with sink decorrelation, its two parts.

    Declared fields (not attributes added afterwards) survive accelerate's mixed-precision output conversion.
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    ce_loss: torch.Tensor | None = None
    decorrelation_loss: torch.Tensor | None = None
    ctc_loss: torch.Tensor | None = None


def batch_to(batch: dict, device: torch.device) -> dict:
    """The batch with every tensor on ``device`` (lists and strings unchanged)."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


class AVSRModel(nn.Module):
    """Frozen encoders + trainable projectors + an (adapted) causal LM, Llama-AVSR style.

    Args:
        llm: the causal LM, usually already a ``PeftModel`` (LoRA, or sink decorrelation around LoRA).
        tokenizer: its tokenizer, holding the modality delimiters (see :func:`prepare_tokenizer`).
        modality: ``"asr"``, ``"vsr"`` or ``"avsr"``.
        audio_encoder, video_encoder: frozen encoders (needed by the modality).
        audio_rate, video_rate: compression rates of the projectors.
        projector: ``"stack"`` or ``"avg"``.
        projector_hidden: the projector MLP's hidden width (2048 in Llama-AVSR).
        projector_layer_norm: LayerNorm at the projector output.
        ctc_weight: weight of the auxiliary CTC loss that aligns the audio tokens with the LLM's token embeddings
            (:mod:`recipes.avsr.alignment`), added to the loss in training mode only; 0 = off.
    """

    def __init__(
        self,
        llm: nn.Module,
        tokenizer,
        modality: str,
        audio_encoder: nn.Module | None = None,
        video_encoder: nn.Module | None = None,
        audio_rate: int = 4,
        video_rate: int = 2,
        projector: str = "stack",
        projector_hidden: int = 2048,
        projector_layer_norm: bool = False,
        ctc_weight: float = 0.0,
    ):
        super().__init__()
        if modality not in PROMPTS:
            raise ValueError(f"modality must be one of {sorted(PROMPTS)}, got {modality!r}")
        uses_audio, uses_video = modality in ("asr", "avsr"), modality in ("vsr", "avsr")
        if not (math.isfinite(ctc_weight) and ctc_weight >= 0):
            raise ValueError(f"ctc_weight must be a finite number >= 0, got {ctc_weight}")
        if ctc_weight and not uses_audio:
            raise ValueError(
                f"ctc_weight aligns the audio tokens, and modality {modality!r} has no audio: set it to 0"
            )
        if uses_audio and audio_encoder is None:
            raise ValueError(f"modality {modality!r} needs an audio encoder")
        if uses_video and video_encoder is None:
            raise ValueError(f"modality {modality!r} needs a video encoder")
        self.modality, self.llm, self.tokenizer = modality, llm, tokenizer
        d_llm = llm.get_input_embeddings().weight.shape[1]
        self.ctc_weight = ctc_weight
        self.ctc_head = EmbeddingCTCHead(d_llm) if ctc_weight else None  # the alignment loss's blank and scale
        self.audio_encoder = audio_encoder if uses_audio else None
        self.video_encoder = video_encoder if uses_video else None
        for enc in (self.audio_encoder, self.video_encoder):
            if enc is not None:
                enc.requires_grad_(False).eval()
        self.audio_proj = (
            ModalityProjector(
                audio_encoder.config.d_model, d_llm, audio_rate, projector, projector_hidden, projector_layer_norm
            )
            if uses_audio
            else None
        )
        self.video_proj = (
            ModalityProjector(
                video_hidden_size(video_encoder), d_llm, video_rate, projector, projector_hidden, projector_layer_norm
            )
            if uses_video
            else None
        )
        vocab = tokenizer.get_vocab()
        missing = [t for t in MODALITY_TOKENS if t not in vocab]
        if missing:
            raise ValueError(
                f"tokenizer lacks {missing}; call prepare_tokenizer(tokenizer) and resize the LLM's embeddings"
            )
        self.ids = {t: vocab[t] for t in MODALITY_TOKENS}
        self.ids.update(bos=tokenizer.bos_token_id, eos=tokenizer.eos_token_id, pad=tokenizer.pad_token_id)
        self.prompt_ids = tokenizer(PROMPTS[modality], add_special_tokens=False).input_ids

    @property
    def device(self) -> torch.device:
        """Where the LLM's input embedding is: every batch tensor is moved there (training, evaluation, decoding)."""
        return self.llm.get_input_embeddings().weight.device

    def train(self, mode: bool = True) -> AVSRModel:
        super().train(mode)
        for enc in (self.audio_encoder, self.video_encoder):  # frozen encoders stay in eval mode (BatchNorm, dropout)
            if enc is not None:
                enc.eval()
        return self

    def enable_feature_cache(self, enabled: bool = True) -> None:
        """Keep every utterance's frozen-encoder output, keyed by its uid, and reuse it in later epochs.

        Exact when the encoders' inputs are the same each time (no input augmentation): the encoders are frozen and
        in eval mode, and each utterance's valid frames do not depend on the rest of the batch.
        """
        self._feature_cache = {"audio": {}, "video": {}} if enabled else None

    @contextmanager
    def feature_cache_paused(self) -> Iterator[None]:
        """Encode every batch afresh inside the block, and leave the cache as it was: for inputs that differ from
        the cached ones under the same uids (the test set with noise added, ``--test_snrs``)."""
        cache, self._feature_cache = getattr(self, "_feature_cache", None), None
        try:
            yield
        finally:
            self._feature_cache = cache

    def _features(self, name: str, batch: dict, lengths: torch.Tensor, run) -> torch.Tensor:
        """Encoder output ``[B, T, D]`` for the batch, from the cache where possible; ``run(rows)`` encodes rows."""
        cache = getattr(self, "_feature_cache", None)
        if cache is None:
            with torch.no_grad():
                return run(list(range(len(lengths))))
        store, uids = cache[name], batch.get(f"{name}_uids", batch["uids"])  # a swapped stream: the donors' uids
        missing = [i for i, uid in enumerate(uids) if uid not in store]
        if missing:
            with torch.no_grad():
                feats = run(missing)
            for j, i in enumerate(missing):
                store[uids[i]] = feats[j, : int(lengths[i])]
        return nn.utils.rnn.pad_sequence([store[uid] for uid in uids], batch_first=True)

    def _encode_audio(self, features: torch.Tensor) -> torch.Tensor:
        """The audio encoder's output in fp32, whatever the dtype of its weights (``--audio_encoder_dtype``)."""
        dtype = next(self.audio_encoder.parameters()).dtype
        return self.audio_encoder(features.to(dtype)).last_hidden_state.float()

    def encode(self, batch: dict) -> tuple[tuple | None, tuple | None]:
        """Run the frozen encoders and the projectors: ``(tokens [B, T', d], lengths)`` per modality."""
        audio = video = None
        if self.audio_encoder is not None:
            lengths = batch["audio_lengths"]
            feats = self._features(  # B, T (50 Hz), D; Whisper's fixed-length padding frames dropped
                "audio",
                batch,
                lengths,
                lambda rows: self._encode_audio(batch["audio_features"][rows]),
            )[:, : int(lengths.max())]
            audio = self.audio_proj(feats, lengths.to(feats.device))
        if self.video_encoder is not None:
            lengths = batch["video_lengths"]
            feats = self._features(  # B, T (25 fps), D
                "video",
                batch,
                lengths,
                lambda rows: self.video_encoder(batch["video"][rows], lengths[rows]).last_hidden_state,
            )
            video = self.video_proj(feats, lengths.to(feats.device))
        return audio, video

    def assemble(
        self, batch: dict, with_transcript: bool, pad_left: bool = False, streams: tuple | None = None
    ) -> SequenceBatch:
        """The batch as LLM input: the prefix, plus the transcript and EOS when ``with_transcript`` (training).

        ``streams`` is :meth:`encode`'s output for this batch, when the caller already has it.
        """
        if with_transcript and "transcript_ids" not in batch:
            raise ValueError(
                "the batch has no transcript_ids; build its AVSRCollator with the LLM's tokenizer "
                "(AVSRCollator(feature_extractor, tokenizer))"
            )
        batch = batch_to(batch, self.device)
        audio, video = streams or self.encode(batch)
        transcripts = batch["transcript_ids"] if with_transcript else None
        return assemble_sequences(
            self.llm.get_input_embeddings(), self.ids, self.prompt_ids, audio, video, transcripts, pad_left
        )

    def forward(self, batch: dict, **kwargs):
        """Teacher-forced pass; returns the LLM's output (``.loss`` is CE on the transcript, plus any tuner loss and,
        in training with ``ctc_weight``, the weighted CTC alignment loss)."""
        batch = batch_to(batch, self.device)
        streams = self.encode(batch)
        seq = self.assemble(batch, with_transcript=True, streams=streams)
        out = self.llm(inputs_embeds=seq.inputs_embeds, attention_mask=seq.attention_mask, labels=seq.labels, **kwargs)
        loss, ctc = out.loss, None
        if self.training and self.ctc_weight:
            tokens, lengths = streams[0]
            embedding = self.llm.get_input_embeddings().weight
            ctc = self.ctc_head(tokens, lengths, embedding, batch["transcript_ids"])
            if ctc is not None:
                loss = loss + self.ctc_weight * ctc
        return AVSROutput(
            loss=loss,
            logits=out.logits,
            ce_loss=getattr(out, "ce_loss", out.loss if ctc is not None else None),
            decorrelation_loss=getattr(out, "decorrelation_loss", None),
            ctc_loss=ctc,
        )

    @torch.no_grad()
    def generate(self, batch: dict, num_beams: int = 15, max_new_tokens: int = 32) -> list[str]:
        """Beam-search transcripts through ``generate`` on the prefix (left-padded)."""
        seq = self.assemble(batch, with_transcript=False, pad_left=True)
        out = self.llm.generate(
            inputs_embeds=seq.inputs_embeds,
            attention_mask=seq.attention_mask,
            num_beams=num_beams,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=self.ids["eos"],
            pad_token_id=self.ids["pad"],
            bos_token_id=self.ids["bos"],
        )
        return [t.strip() for t in self.tokenizer.batch_decode(out, skip_special_tokens=True)]

    @torch.no_grad()
    def ctc_transcripts(self, batch: dict) -> list[str]:
        """What the audio projector spells through the CTC alignment head alone (greedy), without the LLM."""
        if self.ctc_head is None:
            raise ValueError("the model has no CTC alignment head: build it with ctc_weight > 0")
        tokens, lengths = self.encode(batch_to(batch, self.device))[0]
        ids = self.ctc_head.greedy(tokens, lengths, self.llm.get_input_embeddings().weight)
        return [t.strip() for t in self.tokenizer.batch_decode(ids, skip_special_tokens=True)]

    def projector_state_dict(self) -> dict[str, torch.Tensor]:
        """Trainable non-LLM weights (the projectors and the CTC alignment head, when there is one), for
        safetensors."""
        return {
            k: v for k, v in self.state_dict().items() if k.startswith(("audio_proj.", "video_proj.", "ctc_head."))
        }

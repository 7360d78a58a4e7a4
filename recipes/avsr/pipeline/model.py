"""The AVSR model of the recipe, in the Llama-AVSR style (Cappellazzo et al., "Large Language Models are Strong
Audio-Visual Speech Recognition Learners", ICASSP 2025, arXiv 2409.12319; code: umbertocappellazzo/Llama-AVSR).

Frozen audio encoder (a transformers Whisper encoder) and frozen video encoder (lip frames, see
:mod:`recipes.avsr.pipeline.lip_encoder`) → per-modality projector that compresses time by a rate K (stack K
frames or average them) → token sequence

    [BOS, <audio>, A…, </audio>, <video>, V…, </video>, prompt, transcript, EOS]

fed as ``inputs_embeds`` to a frozen causal LM adapted with LoRA (optionally wrapped by sink decorrelation). Only the
transcript and EOS are scored.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from transformers.utils import ModelOutput

from .alignment import EmbeddingCTCHead, check_ctc_weight
from .lip_encoder import video_hidden_size
from .projector import ModalityProjector
from .sequences import MODALITY_TOKENS, PROMPTS, SequenceBatch, assemble_sequences


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
            (:mod:`recipes.avsr.pipeline.alignment`), added to the loss in training mode only; 0 = off.
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
        check_ctc_weight(ctc_weight, (modality,))
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

"""The LLM's input sequence: [BOS, <audio>, A…, </audio>, <video>, V…, </video>, prompt, transcript, EOS].

The prompts and delimiter tokens, and :func:`assemble_sequences`, which lays the projected tokens and the text out
as ``inputs_embeds`` with labels (-100 except the transcript and EOS) and a segment id per position.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

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

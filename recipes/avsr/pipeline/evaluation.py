"""Decoding, scoring and the evaluations around a run: swap controls and the validation loss of each epoch."""

from __future__ import annotations

from collections.abc import Callable

import torch
from accelerate import Accelerator

from ..data.lrs3 import normalize_text
from .controls import SWAPS, derangement


def decode(
    accelerator: Accelerator,
    model,
    loader,
    desc: str,
    num_beams: int = 15,
    max_new_tokens: int = 32,
    skipped: dict[str, str] | None = None,
    read: Callable[[object, dict], list[str]] | None = None,
) -> list[dict]:
    """Beam-search every test utterance; returns ``{"uid", "ref", "hyp"}`` rows (unreadable files go to
    ``skipped``). The model moves each batch to its own device (:meth:`AVSRModel.assemble`). ``read(model, batch)``
    transcribes a batch another way instead (e.g. ``AVSRModel.ctc_transcripts``, the projector's own CTC reading)."""
    from tqdm.auto import tqdm

    model = accelerator.unwrap_model(model)
    model.eval()
    rows = []
    for batch in tqdm(loader, desc=desc, leave=False, disable=not accelerator.is_local_main_process):
        if skipped is not None:
            skipped.update(batch.get("skipped", {}))
        if not batch["uids"]:
            continue
        with accelerator.autocast():
            if read is None:
                hyps = model.generate(batch, num_beams=num_beams, max_new_tokens=max_new_tokens)
            else:
                hyps = read(model, batch)
        rows += [
            {"uid": u, "ref": r, "hyp": normalize_text(h)} for u, r, h in zip(batch["uids"], batch["texts"], hyps)
        ]
    return rows


def score(rows: list[dict]) -> dict:
    """WER and CER (jiwer) on lower-cased, punctuation-free words."""
    import jiwer

    if not rows:
        raise RuntimeError("no test utterance could be decoded (all files unreadable?)")
    refs, hyps = [r["ref"] for r in rows], [r["hyp"] for r in rows]
    return {"wer": round(100 * jiwer.wer(refs, hyps), 2), "cer": round(100 * jiwer.cer(refs, hyps), 2), "n": len(rows)}


def swap_controls(
    accelerator: Accelerator, model, loader, modality: str, seed: int = 0, skipped: dict | None = None, **beams
) -> dict[str, float]:
    """``{"wer_swap_<stream>": WER}``: the test set decoded with one stream of every utterance taken from another
    utterance (:func:`~recipes.avsr.pipeline.controls.derangement` of ``seed``): video and audio for avsr, audio
    for asr, video for vsr. A model that uses the stream gets worse; one that ignores it does not change."""
    dataset = loader.dataset
    donors = derangement(len(dataset), seed)
    out = {}
    for stream in SWAPS[modality]:
        dataset.swap = (stream, donors)
        try:
            rows = decode(accelerator, model, loader, f"decode {modality}, {stream} swapped", skipped=skipped, **beams)
        finally:
            dataset.swap = None
        out[f"wer_swap_{stream}"] = score(rows)["wer"]
    return out


@torch.no_grad()
def validation_loss(accelerator: Accelerator, model, loader) -> float:
    """The teacher-forced loss over ``loader``, each batch weighted by its transcript tokens (+ EOS); the model is
    put back in training mode afterwards."""
    model = accelerator.unwrap_model(model)
    model.eval()
    total, tokens = 0.0, 0
    try:
        for batch in loader:
            if not batch["uids"]:
                continue
            with accelerator.autocast():
                loss = model(batch).loss
            n = sum(len(ids) + 1 for ids in batch["transcript_ids"])
            total, tokens = total + loss.item() * n, tokens + n
    finally:
        model.train()
    if not tokens:
        raise RuntimeError("no validation utterance could be read (--val_utts)")
    return round(total / tokens, 4)

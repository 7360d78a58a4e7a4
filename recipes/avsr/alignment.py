"""An auxiliary CTC loss that aligns the audio projector's tokens with the LLM's own token embeddings.

Each projected audio token is scored against every row of the LLM's input embedding matrix (dot products: one logit
per vocabulary entry) and against a trainable blank vector, and CTC over those logits asks the token sequence to
spell the transcript's token ids (the blank is a class of its own: no vocabulary token is given up for it).
Minimising it pulls the projector's output towards the embeddings of the tokens being spoken, so the frozen LLM sees
something close to the text it would read; the transcript's cross-entropy alone gives the projector that signal only
through the whole LLM. The embedding matrix is detached: the loss trains the projector (and the blank), not the
LLM's vocabulary.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn


def ctc_frames_needed(target: list[int]) -> int:
    """The fewest input frames CTC needs to emit ``target``: one per token, plus a blank between repeated tokens."""
    return len(target) + sum(a == b for a, b in zip(target, target[1:]))


def embedding_ctc_loss(
    tokens: torch.Tensor,
    lengths: torch.Tensor,
    embedding: torch.Tensor,
    blank: torch.Tensor,
    targets: list[list[int]],
) -> torch.Tensor | None:
    """CTC of projected tokens ``[B, T, d]`` (valid ``lengths [B]``) against ``targets`` over the vocabulary of
    ``embedding [V, d]`` plus the ``blank [d]`` (class ``V``), averaged over utterances (each utterance's loss
    divided by its target length).

    Utterances too short for their transcript (fewer tokens than :func:`ctc_frames_needed`) are left out with a
    warning naming the fix; ``None`` when none is left.
    """
    needed = torch.tensor([ctc_frames_needed(t) for t in targets])
    usable = (needed <= lengths.cpu()) & (needed > 0)
    if not bool(usable.all()):
        warnings.warn(
            f"CTC alignment loss: {int((~usable).sum())} of {len(targets)} utterances have fewer audio tokens than "
            "their transcript needs and are left out of it; lower --audio_rate to give each utterance more tokens",
            stacklevel=2,
        )
    if not bool(usable.any()):
        return None
    rows = usable.nonzero().flatten().tolist()
    classes = torch.cat([embedding.detach().float(), blank.float()[None]])  # V + 1, d
    logits = tokens[rows].float() @ classes.T  # B', T, V + 1
    log_probs = nn.functional.log_softmax(logits, dim=-1).transpose(0, 1)  # T, B', V
    flat = torch.tensor([i for r in rows for i in targets[r]], dtype=torch.long, device=tokens.device)
    return nn.functional.ctc_loss(
        log_probs,
        flat,
        input_lengths=lengths[rows].to(tokens.device),
        target_lengths=torch.tensor([len(targets[r]) for r in rows], dtype=torch.long, device=tokens.device),
        blank=len(classes) - 1,
        reduction="mean",
    )

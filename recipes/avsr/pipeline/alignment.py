"""An auxiliary CTC loss that aligns the audio projector's tokens with the LLM's own token embeddings.

Each projected audio token is scored against every row of the LLM's input embedding matrix and against a trainable
blank vector by cosine similarity times a trainable scale (one logit per vocabulary entry, plus the blank, a class of
its own), and CTC over those logits asks the token sequence to spell the transcript's token ids. Minimising it turns
the projector's output towards the embeddings of the tokens being spoken, so the frozen LLM sees something close to
the text it would read; the transcript's cross-entropy alone gives the projector that signal only through the whole
LLM. Cosine scores leave the tokens' norm to the cross-entropy. The embedding matrix is detached: the loss trains the
projector (and the head's blank and scale), not the LLM's vocabulary. The scores are computed in the embedding's
dtype (bf16 for a bf16 LLM, as its own logits are), the log-softmax and CTC in fp32.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import nn


def check_ctc_weight(ctc_weight: float, modalities: tuple[str, ...] = ()) -> None:
    """The one rule of ``--ctc_weight``: a finite weight >= 0, and audio in every modality it trains."""
    if not (math.isfinite(ctc_weight) and ctc_weight >= 0):
        raise ValueError(f"--ctc_weight must be a finite number >= 0 (0 turns it off), got {ctc_weight}")
    if ctc_weight and "vsr" in modalities:
        raise ValueError(
            "--ctc_weight aligns the audio tokens, and --modality vsr has none: drop vsr, or train it in a separate "
            "run without --ctc_weight"
        )


def ctc_frames_needed(target: list[int]) -> int:
    """The fewest input frames CTC needs to emit ``target``: one per token, plus a blank between repeated tokens."""
    return len(target) + sum(a == b for a, b in zip(target, target[1:]))


class EmbeddingCTCHead(nn.Module):
    """The trainable part of the alignment loss: CTC's blank vector and the cosine scale (initially ``scale``).

    The scale bounds how sharp the distribution over the vocabulary can be, and it moves slowly (by about the
    learning rate per step, in log space), so it starts high: token embeddings of an LLM are close to each other
    (SmolLM2-135M: a row's nearest other row has cosine 0.65 on average, over its first 5,000 rows), and at scale
    30 a token pointing at its target row still leads that neighbour by about 10 nats, the log of a 50k vocabulary.
    """

    def __init__(self, dim: int, scale: float = 30.0):
        super().__init__()
        # its own generator: the head leaves the global RNG, and so the projectors' initialisation, as without it
        self.blank = nn.Parameter(torch.randn(dim, generator=torch.Generator().manual_seed(0)) / math.sqrt(dim))
        self.log_scale = nn.Parameter(torch.tensor(math.log(scale)))

    def forward(
        self, tokens: torch.Tensor, lengths: torch.Tensor, embedding: torch.Tensor, targets: list[list[int]]
    ) -> torch.Tensor | None:
        """CTC of tokens ``[B, T, d]`` (valid ``lengths [B]``) against ``targets`` over the vocabulary of
        ``embedding [V, d]`` plus the blank (class ``V``), averaged over utterances (each utterance's loss divided by
        its target length).

        Utterances too short for their transcript (fewer tokens than :func:`ctc_frames_needed`) are left out with a
        warning naming the fix; ``None`` when none is left.
        """
        needed = torch.tensor([ctc_frames_needed(t) for t in targets])
        usable = (needed <= lengths.cpu()) & (needed > 0)
        if not bool(usable.all()):
            warnings.warn(
                f"CTC alignment loss: {int((~usable).sum())} of {len(targets)} utterances have fewer audio tokens "
                "than their transcript needs and are left out of it; lower --audio_rate to give each utterance more "
                "tokens",
                stacklevel=2,
            )
        if not bool(usable.any()):
            return None
        rows = usable.nonzero().flatten().tolist()
        cosines = self._cosines(tokens[rows], embedding)  # B', T, V + 1
        log_probs = (self.log_scale.exp() * cosines.float()).log_softmax(-1).transpose(0, 1)  # T, B', V + 1
        flat = torch.tensor([i for r in rows for i in targets[r]], dtype=torch.long, device=tokens.device)
        return nn.functional.ctc_loss(
            log_probs,
            flat,
            input_lengths=lengths[rows].to(tokens.device),
            target_lengths=torch.tensor([len(targets[r]) for r in rows], dtype=torch.long, device=tokens.device),
            blank=len(embedding),
            reduction="mean",
        )

    def _cosines(self, tokens: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        """Cosine of every token ``[B, T, d]`` to every embedding row and the blank: ``[B, T, V + 1]``."""
        dtype = embedding.dtype
        classes = nn.functional.normalize(torch.cat([embedding.detach(), self.blank[None].to(dtype)]), dim=-1)
        return nn.functional.normalize(tokens, dim=-1).to(dtype) @ classes.T

    @torch.no_grad()
    def greedy(self, tokens: torch.Tensor, lengths: torch.Tensor, embedding: torch.Tensor) -> list[list[int]]:
        """CTC's greedy reading of each utterance's valid tokens: the best class per token, repeats merged, blanks
        dropped. It shows what the projector spells on its own, without the LLM."""
        best = self._cosines(tokens, embedding).argmax(-1).tolist()
        blank, out = len(embedding), []
        for row, n in zip(best, lengths.tolist()):
            merged = [c for i, c in enumerate(row[:n]) if i == 0 or c != row[i - 1]]
            out.append([c for c in merged if c != blank])
        return out

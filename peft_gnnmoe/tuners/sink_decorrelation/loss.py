"""The BOS-decorrelation loss and the token bookkeeping it needs (BOS position, selected tokens).

For a hidden state ``h`` of shape ``(B, T, D)`` at one layer, the BOS row ``bos_b`` of each sequence and a boolean
mask ``m`` of the tokens that enter the loss (selected, not BOS), the per-sequence, per-layer sum is

    S_l[b] = sum_t m[b, t] * f(cos(h[b, bos_b], h[b, t])),   f = x**2 ("squared") or |x| ("abs"),

and ``n[b] = sum_t m[b, t]``. ``reduction="sample"`` gives every sequence its own term
``L[b] = mean_l S_l[b] / n[b]`` (0 when ``n[b] = 0``), which depends on that sequence only, so that weighting it like
the model's own loss is exact under gradient accumulation and several processes; ``reduction="tokens"`` is the
reference code's ``mean_l sum_b S_l[b] / sum_b n[b]``, a mean over all selected tokens of the micro-batch.
"""

from __future__ import annotations

import contextlib
from typing import Literal

import torch

Form = Literal["squared", "abs"]


def valid_token_mask(attention_mask: torch.Tensor | None, batch_size: int, seq_len: int, device) -> torch.Tensor:
    """Boolean ``(B, T)`` mask of real (non-padding) tokens from a 2-D attention mask (all tokens when None)."""
    if attention_mask is None:
        return torch.ones(batch_size, seq_len, dtype=torch.bool, device=device)
    if attention_mask.dim() != 2:
        raise ValueError(
            f"the decorrelation loss needs a 2-D (batch, seq) attention_mask to know the padding, got shape "
            f"{tuple(attention_mask.shape)}; pass `decorrelation_mask=` (a (batch, seq) bool tensor) instead."
        )
    return attention_mask.to(device=device).bool()


def find_bos_positions(
    valid: torch.Tensor,
    input_ids: torch.Tensor | None = None,
    bos_token_id: int | None = None,
    bos: Literal["token", "first"] = "token",
    bos_positions: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """Index of the BOS token of every sequence, shape ``(B,)``.

    Order of precedence: explicit ``bos_positions`` (an int for all rows or a ``(B,)`` tensor; needed for multimodal
    ``inputs_embeds``), then ``bos="first"`` (the first non-padding position), then ``bos="token"`` (the first
    non-padding occurrence of ``bos_token_id`` in ``input_ids``). Rows without any valid token get position 0: they
    contribute nothing to the loss.
    """
    batch_size, seq_len = valid.shape
    device = valid.device
    has_tokens = valid.any(dim=1)
    if bos_positions is not None:
        positions = torch.as_tensor(bos_positions, device=device, dtype=torch.long)
        positions = positions.expand(batch_size) if positions.dim() == 0 else positions.reshape(-1)
        if positions.shape[0] != batch_size:
            raise ValueError(f"bos_positions has {positions.shape[0]} entries for a batch of {batch_size}.")
        if ((positions < 0) | (positions >= seq_len)).any():
            raise ValueError(f"bos_positions {positions.tolist()} out of range for sequences of length {seq_len}.")
        rows = torch.arange(batch_size, device=device)
        if (has_tokens & ~valid[rows, positions]).any():
            raise ValueError(f"bos_positions {positions.tolist()} point at padding (attention_mask is 0 there).")
        return positions
    if bos == "first":
        return valid.int().argmax(dim=1)
    if bos != "token":
        raise ValueError(f"bos must be 'token' or 'first', got {bos!r}.")
    if bos_token_id is None:
        raise ValueError(
            "cannot locate the BOS token: the model config has no bos_token_id. Set "
            "SinkDecorrelationConfig(bos_token_id=...) or bos='first', or pass bos_positions= to forward()."
        )
    if input_ids is None:
        raise ValueError(
            "cannot locate the BOS token without input_ids (inputs_embeds were given): pass bos_positions= to "
            "forward() or use SinkDecorrelationConfig(bos='first')."
        )
    is_bos = (input_ids.to(device) == bos_token_id) & valid
    missing = has_tokens & ~is_bos.any(dim=1)
    if missing.any():
        rows = missing.nonzero().flatten().tolist()
        raise ValueError(
            f"sequences {rows} contain no BOS token (id {bos_token_id}) among their valid tokens. Make the tokenizer "
            "add it, pass bos_positions= to forward(), or use SinkDecorrelationConfig(bos='first')."
        )
    return is_bos.int().argmax(dim=1)


Tokens = Literal["all", "prefix", "reference"]


def reference_prefix_mask(labels: torch.Tensor, bos_positions: torch.Tensor) -> torch.Tensor:
    """The reference code's selection: the positions after BOS and before the first label that is not -100.

    In the reference layout ``[BOS, modality tokens, prompt, transcript, EOS]`` these are positions
    ``1 .. number of prompt tokens``; trailing padding (label -100 after the transcript) is never selected, with or
    without an attention mask. A sequence without any target label selects nothing.
    """
    positions = torch.arange(labels.shape[1], device=labels.device)[None, :]
    after_bos = positions > bos_positions.to(labels.device)[:, None]
    targets = (labels != -100) & after_bos
    first_target = torch.where(targets.any(dim=1), targets.int().argmax(dim=1), 0)
    return after_bos & (positions < first_target[:, None])


def decorrelation_token_mask(
    valid: torch.Tensor,
    bos_positions: torch.Tensor,
    tokens: Tokens = "all",
    labels: torch.Tensor | None = None,
    decorrelation_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Boolean ``(B, T)`` mask of the tokens compared with BOS: valid, not BOS, and selected by ``tokens``.

    ``tokens="all"`` keeps every valid token (SPEC default); ``tokens="prefix"`` keeps the non-output tokens, i.e.
    those with ``labels == -100`` (modality tokens, delimiters, prompt; without an attention mask also trailing
    padding, whose label is -100 too); ``tokens="reference"`` keeps exactly the reference code's positions (see
    ``reference_prefix_mask``). ``decorrelation_mask`` (bool ``(B, T)``) replaces the ``tokens`` rule when given.
    """
    mask = valid.clone()
    if decorrelation_mask is not None:
        if decorrelation_mask.shape != valid.shape:
            raise ValueError(
                f"decorrelation_mask has shape {tuple(decorrelation_mask.shape)}, expected {tuple(valid.shape)}."
            )
        mask &= decorrelation_mask.to(valid.device).bool()
    elif tokens in ("prefix", "reference"):
        if labels is None:
            raise ValueError(
                f"tokens={tokens!r} selects tokens by their labels, but this call has no labels: pass labels= to "
                "forward() (transformers' Trainer removes them when label smoothing or compute_loss_func is set; "
                "use tokens='all' or decorrelation_mask= there)."
            )
        labels = labels.to(valid.device)
        mask &= (labels == -100) if tokens == "prefix" else reference_prefix_mask(labels, bos_positions)
    elif tokens != "all":
        raise ValueError(f"tokens must be 'all', 'prefix' or 'reference', got {tokens!r}.")
    mask[torch.arange(valid.shape[0], device=valid.device), bos_positions] = False
    return mask


class _CosineToBos(torch.autograd.Function):
    """``cos(h[b, t], h[b, bos_b])`` with a fused backward: three passes over ``(B, T, D)`` instead of about ten.

    With ``n_t = |h_t|``, ``u = h_bos`` and ``c_t = h_t . u / (n_t |u|)``, the gradient of ``sum_t g_t c_t`` is
    ``g_t (u / (n_t |u|) - c_t h_t / n_t**2)`` for ``h_t``, plus ``sum_t g_t (h_t / (n_t |u|) - c_t u / |u|**2)`` for
    the BOS row. Only ``hidden`` (kept alive by the next layer anyway) and ``(B, T)`` tensors are saved.
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, bos_positions: torch.Tensor, eps: float) -> torch.Tensor:
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        bos = hidden[rows, bos_positions]  # B, D
        accumulate = torch.promote_types(hidden.dtype, torch.float32)  # float32, or float64 for double inputs
        dots = torch.bmm(hidden, bos.unsqueeze(-1)).squeeze(-1).to(accumulate)  # B, T
        norms = torch.linalg.vector_norm(hidden, dim=-1, dtype=accumulate).clamp_min(eps)  # B, T
        cos = dots / (norms * norms[rows, bos_positions][:, None])
        ctx.save_for_backward(hidden, bos_positions, norms, cos)
        return cos

    @staticmethod
    def backward(ctx, grad_cos: torch.Tensor):
        hidden, bos_positions, norms, cos = ctx.saved_tensors
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        bos = hidden[rows, bos_positions]  # B, D
        bos_norms = norms[rows, bos_positions]  # B
        along_bos = grad_cos / (norms * bos_norms[:, None])  # B, T: coefficient of u in the gradient of h_t
        along_self = grad_cos * cos / norms.square()  # B, T: coefficient of h_t
        dtype = hidden.dtype
        grad_hidden = torch.baddbmm(
            hidden * -along_self.to(dtype)[..., None], along_bos.to(dtype)[..., None], bos[:, None, :]
        )  # B, T, D
        grad_bos = torch.bmm(along_bos.to(dtype)[:, None, :], hidden).squeeze(1)  # B, D
        grad_bos -= ((grad_cos * cos).sum(dim=1) / bos_norms.square()).to(dtype)[:, None] * bos
        grad_hidden[rows, bos_positions] += grad_bos
        return grad_hidden, None, None


def cosine_to_bos(hidden: torch.Tensor, bos_positions: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Cosine similarity of every token to its sequence's BOS token, ``(B, T)`` in float32 (float64 for double).

    Computed in the hidden state's own dtype without autocast (float32 norms and cosines), so no ``(B, T, D)`` copy
    is kept for backward; the backward is fused (see ``_CosineToBos``).
    """
    with _no_autocast(hidden.device.type):
        return _CosineToBos.apply(hidden, bos_positions.to(hidden.device), eps)


def _no_autocast(device_type: str) -> contextlib.AbstractContextManager:
    """Autocast off on ``device_type`` (a no-op where that device has no autocast)."""
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type=device_type, enabled=False)
    return contextlib.nullcontext()


class _CosineToOwnBos(torch.autograd.Function):
    """``cos(h[b, t], h[b, bos[b, t]])`` for a BOS index per token (packed rows: each sequence has its own BOS).

    The same gradient as ``_CosineToBos``, with each token's BOS-row part scattered back to its own BOS position.
    Saves ``hidden`` and ``(B, T)`` tensors only; the ``(B, T, D)`` gather of the BOS rows is redone in backward.
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, bos_index: torch.Tensor, eps: float) -> torch.Tensor:
        bos = hidden.gather(1, bos_index[..., None].expand_as(hidden))  # B, T, D
        accumulate = torch.promote_types(hidden.dtype, torch.float32)
        dots = (hidden * bos).sum(dim=-1, dtype=accumulate)  # B, T
        norms = torch.linalg.vector_norm(hidden, dim=-1, dtype=accumulate).clamp_min(eps)  # B, T
        cos = dots / (norms * norms.gather(1, bos_index))
        ctx.save_for_backward(hidden, bos_index, norms, cos)
        return cos

    @staticmethod
    def backward(ctx, grad_cos: torch.Tensor):
        hidden, bos_index, norms, cos = ctx.saved_tensors
        index = bos_index[..., None].expand_as(hidden)
        bos = hidden.gather(1, index)  # B, T, D
        bos_norms = norms.gather(1, bos_index)  # B, T
        dtype = hidden.dtype
        along_bos = (grad_cos / (norms * bos_norms)).to(dtype)[..., None]
        along_self = (grad_cos * cos / norms.square()).to(dtype)[..., None]
        grad_hidden = bos * along_bos - hidden * along_self
        to_bos = hidden * along_bos - bos * (grad_cos * cos / bos_norms.square()).to(dtype)[..., None]
        return grad_hidden.scatter_add_(1, index, to_bos), None, None


def packed_layer_penalty_sums(
    hidden: torch.Tensor,
    bos_index: torch.Tensor,
    token_mask: torch.Tensor,
    sequence: torch.Tensor,
    num_sequences: int,
    form: Form = "squared",
) -> torch.Tensor:
    """``S[s]`` of every sequence ``s`` packed in ``hidden`` (``(B, T, D)``), shape ``(num_sequences,)``.

    ``bos_index`` (``(B, T)``) is the row position of each token's own BOS, ``sequence`` (``(B, T)``) the index of
    its sequence; see ``peft_gnnmoe.utils.packing.PackedLayout``.
    """
    device = hidden.device
    with _no_autocast(device.type):
        cos = _CosineToOwnBos.apply(hidden, bos_index.to(device), 1e-6)
    values = (cos.square() if form == "squared" else cos.abs()) * token_mask.to(device=device, dtype=cos.dtype)
    sums = values.new_zeros(num_sequences)
    return sums.index_add(0, sequence.to(device).flatten(), values.flatten())


def layer_penalty_sums(
    hidden: torch.Tensor, bos_positions: torch.Tensor, token_mask: torch.Tensor, form: Form = "squared"
) -> torch.Tensor:
    """``S[b] = sum_t mask[b, t] * f(cos(h[b, bos_b], h[b, t]))``, shape ``(B,)``, on ``hidden``'s device.

    ``bos_positions`` and ``token_mask`` are moved to ``hidden``'s device, so layers spread over several devices
    (``device_map="auto"``) each compute their term where their output lives.
    """
    cos = cosine_to_bos(hidden, bos_positions)
    values = cos.square() if form == "squared" else cos.abs()
    # an empty mask gives 0 that is still attached to the graph, so backward and DDP see the same parameters
    return (values * token_mask.to(device=values.device, dtype=values.dtype)).sum(dim=1)


def reduce_layer_sums(
    layer_sums: list[torch.Tensor], counts: torch.Tensor, reduction: Literal["sample", "tokens"] = "sample"
) -> torch.Tensor:
    """Combine per-layer ``S_l`` (each ``(B,)``) with the per-sequence token counts ``n`` (``(B,)``).

    ``"sample"`` returns the ``(B,)`` per-sequence terms ``mean_l S_l[b] / n[b]``; ``"tokens"`` returns the scalar
    ``mean_l sum_b S_l[b] / sum_b n[b]``. Everything is moved to ``counts``' device.
    """
    sums = torch.stack([s.to(counts.device) for s in layer_sums])  # L, B
    counts = counts.to(sums.dtype)
    if reduction == "sample":
        return sums.mean(dim=0) / counts.clamp_min(1.0)
    if reduction == "tokens":
        return (sums.sum(dim=1) / counts.sum().clamp_min(1.0)).mean()
    raise ValueError(f"reduction must be 'sample' or 'tokens', got {reduction!r}.")


def layer_decorrelation_loss(
    hidden: torch.Tensor, bos_positions: torch.Tensor, token_mask: torch.Tensor, form: Form = "squared"
) -> torch.Tensor:
    """Mean of ``cos**2`` (or ``|cos|``) to BOS over all tokens in ``token_mask``; 0 when the mask is empty."""
    sums = layer_penalty_sums(hidden, bos_positions, token_mask, form)
    return sums.sum() / token_mask.sum().to(device=sums.device, dtype=sums.dtype).clamp_min(1.0)

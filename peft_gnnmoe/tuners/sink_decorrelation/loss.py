"""The BOS-decorrelation loss and the token bookkeeping it needs (BOS position, valid tokens).

For a hidden state ``h`` of shape ``(B, T, D)`` at one layer, the BOS row ``b`` of each sequence and a boolean mask
``m`` of the tokens that enter the loss (valid, not BOS), the per-layer loss is

    L_l = sum_{b,t} m[b, t] * f(cos(h[b, bos_b], h[b, t])) / sum_{b,t} m[b, t],   f = x**2 ("squared") or |x| ("abs"),

i.e. a mean over all selected tokens of the batch; the decorrelation loss is the mean of ``L_l`` over the chosen
layers.
"""

from __future__ import annotations

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


def decorrelation_token_mask(
    valid: torch.Tensor,
    bos_positions: torch.Tensor,
    tokens: Literal["all", "prefix"] = "all",
    labels: torch.Tensor | None = None,
    decorrelation_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Boolean ``(B, T)`` mask of the tokens compared with BOS: valid, not BOS, and selected by ``tokens``.

    ``tokens="all"`` keeps every valid token (SPEC default); ``tokens="prefix"`` keeps the non-output tokens, i.e.
    those with ``labels == -100`` (modality tokens, delimiters, prompt: the reference implementation's choice).
    ``decorrelation_mask`` (bool ``(B, T)``) replaces the ``tokens`` rule when given.
    """
    mask = valid.clone()
    if decorrelation_mask is not None:
        if decorrelation_mask.shape != valid.shape:
            raise ValueError(
                f"decorrelation_mask has shape {tuple(decorrelation_mask.shape)}, expected {tuple(valid.shape)}."
            )
        mask &= decorrelation_mask.to(valid.device).bool()
    elif tokens == "prefix":
        if labels is None:
            raise ValueError("tokens='prefix' selects the tokens whose label is -100: pass labels= to forward().")
        mask &= labels.to(valid.device) == -100
    elif tokens != "all":
        raise ValueError(f"tokens must be 'all' or 'prefix', got {tokens!r}.")
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
    with torch.autocast(device_type=hidden.device.type, enabled=False):
        return _CosineToBos.apply(hidden, bos_positions.to(hidden.device), eps)


def layer_decorrelation_loss(
    hidden: torch.Tensor, bos_positions: torch.Tensor, token_mask: torch.Tensor, form: Form = "squared"
) -> torch.Tensor:
    """Mean of ``cos**2`` (or ``|cos|``) to BOS over the tokens in ``token_mask``; 0 when the mask is empty."""
    cos = cosine_to_bos(hidden, bos_positions)
    values = cos.square() if form == "squared" else cos.abs()
    weights = token_mask.to(values.dtype)
    # an empty mask gives 0 that is still attached to the graph, so backward and DDP see the same parameters
    return (values * weights).sum() / weights.sum().clamp_min(1.0)

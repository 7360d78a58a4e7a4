"""Massive activations (Sun et al., 2024): huge residual-stream values at few fixed features and few tokens.

An activation ``h_l[b, t, d]`` is massive when ``|h| > magnitude_threshold`` and ``|h| > ratio_threshold * median``,
with the median of ``|h_l|`` over the layer's valid tokens (defaults 100 and 1000, as in the paper; smaller models need
smaller thresholds). For each massive activation the branch that created it is reported: ``"residual"`` when it was
already massive at the layer input (carried over; ``"embeddings"`` at the first layer, whose input is the embedding
output), else ``"attention"`` or ``"mlp"``, whichever residual branch added more to it in this layer (the residual
stream between the branches is the input of the pre-MLP norm of a pre-norm block), or ``"unknown"`` for blocks of
another shape.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from ..utils.model_introspection import find_decoder_layers
from ._inputs import Batch, as_batch, inference, is_causal, to_list, valid_mask
from .vision import is_vision_batch

# the module whose input is the residual stream after attention, in the order they are tried (Gemma2/3 apply their
# post_attention_layernorm to the attention output, so their pre_feedforward_layernorm comes first)
# ViT/DeiT/BEiT call it layernorm_after, DINOv2 norm2, CLIP/SigLIP layer_norm2
PRE_MLP_NORM_NAMES = (
    "pre_feedforward_layernorm",
    "post_attention_layernorm",
    "ln_2",
    "layernorm_after",
    "norm2",
    "layer_norm2",
)


@dataclass
class MassiveActivation:
    """One massive value: where it is, how big, and which branch of the layer produced it."""

    layer: int
    batch: int
    token: int
    feature: int
    value: float
    ratio_to_median: float
    origin: str
    attention_delta: float | None = None
    mlp_delta: float | None = None


@dataclass
class LayerActivationStats:
    """Per layer: median |h| over valid tokens, the top-k |h| entries of every sequence, the massive ones, and
    ``norms[b][t]``, the L2 norm of every token's hidden state (0 at padding; high-norm ViT tokens show there)."""

    layer: int
    median: float
    top: list[dict]
    massive: list[MassiveActivation] = field(default_factory=list)
    norms: list = field(default_factory=list)


@dataclass
class MassiveActivationReport:
    """Result of [`find_massive_activations`][peft_gnnmoe.analysis.find_massive_activations].

    ``to_dict()`` is JSON-serialisable.
    """

    magnitude_threshold: float
    ratio_threshold: float
    layers: list[LayerActivationStats]
    first_layer: int | None
    features: dict[int, int]  # feature index -> number of distinct (batch, token) where it is massive
    tokens: list[dict]  # {"batch", "token", "layers"}: tokens that carry massive values, and in how many layers
    origins: dict[str, int]  # where new massive values are created (entries carried over are not counted)
    causal: bool | None = None  # decoder (True), encoder (False), unknown (None): names the layers in the plots

    @property
    def massive(self) -> list[MassiveActivation]:
        return [m for stats in self.layers for m in stats.massive]

    @property
    def repeated_features(self) -> list[int]:
        """Feature indices massive at more than one token: the fixed dimensions shared by sink tokens."""
        return sorted(f for f, n in self.features.items() if n > 1)

    def to_dict(self) -> dict:
        output = asdict(self)
        output["features"] = {str(k): v for k, v in self.features.items()}
        output["repeated_features"] = self.repeated_features
        return output


class _LayerRecorder:
    """Hooks that keep one layer's input, mid-block residual and output, then hand them to ``on_output``."""

    def __init__(self, index: int, layer: nn.Module, on_output):
        self.index = index
        self.on_output = on_output
        self.norm = next((getattr(layer, n) for n in PRE_MLP_NORM_NAMES if hasattr(layer, n)), None)
        self.input: torch.Tensor | None = None
        self.mid: torch.Tensor | None = None
        self.output: torch.Tensor | None = None
        self.handles = [
            layer.register_forward_pre_hook(self._on_input, with_kwargs=True),
            layer.register_forward_hook(self._on_output),
        ]
        if self.norm is not None:
            self.handles.append(self.norm.register_forward_pre_hook(self._on_mid))

    def _on_input(self, module, args, kwargs):
        hidden = args[0] if args else kwargs.get("hidden_states")
        self.input, self.mid = (None if hidden is None else hidden.detach().float()), None

    def _on_mid(self, module, args):
        if self.mid is None:  # the first call is the one on the residual stream
            self.mid = args[0].detach().float()

    def _on_output(self, module, args, output):
        hidden = output[0] if isinstance(output, (tuple, list)) else output
        self.output = hidden.detach().float()
        self.on_output(self)
        self.input = self.mid = self.output = None  # only one layer's tensors are held at a time

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def find_massive_activations(
    model: nn.Module,
    batch: Batch,
    magnitude_threshold: float = 100.0,
    ratio_threshold: float = 1000.0,
    top_k: int = 3,
    layers_module: str | None = None,
) -> MassiveActivationReport:
    """Run ``model`` on ``batch`` and report the massive activations of every decoder (or encoder) layer's output.

    Args:
        model: a transformers model (or a ``PeftModel`` around one), decoder or encoder (ViTs too).
        batch: forward kwargs (``input_ids`` or ``inputs_embeds``, optional 2-D ``attention_mask``; or an image
            model's ``pixel_values``, whose tokens are CLS, other prefix tokens, then the patches) or an id tensor.
        magnitude_threshold: minimum ``|value|`` of a massive activation.
        ratio_threshold: minimum ``|value| / median(|h_l|)``.
        top_k: how many largest ``|value|`` entries to list per layer and sequence.
        layers_module: path of the decoder layers' ``nn.ModuleList`` if it is not found automatically.
    """
    batch = as_batch(batch)
    valid = None if is_vision_batch(batch) else valid_mask(batch)
    stats: list[LayerActivationStats] = []

    def reduce(recorder: _LayerRecorder) -> None:
        mask = valid_mask(batch, recorder.output.shape[1]) if valid is None else valid  # images: every token
        stats.append(_layer_stats(recorder, mask, magnitude_threshold, ratio_threshold, top_k))

    with inference(model) as base:
        _, layers = find_decoder_layers(base, layers_module)
        recorders = [_LayerRecorder(i, layer, reduce) for i, layer in enumerate(layers)]
        try:
            base(**batch)
        finally:
            for recorder in recorders:
                recorder.remove()
    report = _summarise(stats, magnitude_threshold, ratio_threshold)
    with contextlib.suppress(ValueError):  # unknown attention kind: the plots say "layer"
        report.causal = is_causal(model)
    return report


def _layer_stats(
    recorder: _LayerRecorder, valid: torch.Tensor, magnitude: float, ratio: float, top_k: int
) -> LayerActivationStats:
    out = recorder.output  # B, T, D
    mask = valid.to(out.device)
    abs_out = out.abs() * mask[..., None]  # padding never counts
    median = out.abs()[mask].median().item() if mask.any() else 0.0
    top = []
    for b in range(out.shape[0]):  # the top-k of every sequence, so one sequence cannot fill the list
        _, flat = abs_out[b].flatten().topk(min(top_k, abs_out[b].numel()))
        for index in flat.tolist():
            t, d = divmod(index, out.shape[2])
            top.append({"batch": b, "token": t, "feature": d, "value": round(out[b, t, d].item(), 3)})
    hits = ((abs_out > magnitude) & (abs_out > ratio * median)).nonzero().tolist()
    massive = [_classify(recorder, b, t, d, median, magnitude, ratio) for b, t, d in hits]
    norms = to_list(out.norm(dim=-1) * mask, 3)
    return LayerActivationStats(layer=recorder.index, median=round(median, 5), top=top, massive=massive, norms=norms)


def _classify(recorder: _LayerRecorder, b: int, t: int, d: int, median: float, magnitude: float, ratio: float):
    value = recorder.output[b, t, d].item()
    origin, attention_delta, mlp_delta = "unknown", None, None
    carried = recorder.input is not None and abs(recorder.input[b, t, d].item()) > max(magnitude, ratio * median)
    if carried:  # the first layer's input is the embedding output
        origin = "embeddings" if recorder.index == 0 else "residual"
    if recorder.input is not None and recorder.mid is not None and recorder.mid.shape == recorder.output.shape:
        attention_delta = recorder.mid[b, t, d].item() - recorder.input[b, t, d].item()
        mlp_delta = value - recorder.mid[b, t, d].item()
        if not carried:
            origin = "mlp" if abs(mlp_delta) >= abs(attention_delta) else "attention"
    return MassiveActivation(
        layer=recorder.index,
        batch=b,
        token=t,
        feature=d,
        value=round(value, 3),
        ratio_to_median=round(abs(value) / max(median, 1e-12), 1),
        origin=origin,
        attention_delta=None if attention_delta is None else round(attention_delta, 3),
        mlp_delta=None if mlp_delta is None else round(mlp_delta, 3),
    )


def _summarise(stats: list[LayerActivationStats], magnitude: float, ratio: float) -> MassiveActivationReport:
    entries = [m for s in stats for m in s.massive]
    features: dict[int, set] = {}
    token_layers: dict[tuple[int, int], set] = {}
    for m in entries:
        features.setdefault(m.feature, set()).add((m.batch, m.token))
        token_layers.setdefault((m.batch, m.token), set()).add(m.layer)
    origins = Counter(m.origin for m in entries if m.origin != "residual")
    return MassiveActivationReport(
        magnitude_threshold=magnitude,
        ratio_threshold=ratio,
        layers=stats,
        first_layer=min((m.layer for m in entries), default=None),
        features={f: len(tokens) for f, tokens in sorted(features.items())},
        tokens=[{"batch": b, "token": t, "layers": len(n)} for (b, t), n in sorted(token_layers.items())],
        origins=dict(origins),
    )

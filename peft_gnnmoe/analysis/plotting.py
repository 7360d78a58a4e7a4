"""PNG plots of the analysis reports (matplotlib, Agg backend). They take the plain reports (or their dicts).

``*_figure`` functions return the matplotlib figure; ``plot_*`` save it as a PNG and return the path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

# byte-level BPE (GPT-2, Llama 3, SmolLM) and SentencePiece markers for a leading space / a newline
_TOKEN_MARKERS = {"Ġ": " ", "▁": " ", "Ċ": "\n", "ĉ": "\t"}


def _as_dict(report: Any) -> dict:
    return report.to_dict() if hasattr(report, "to_dict") else report


def clean_token(token: str) -> str:
    """A readable tick label: tokenizer space/newline markers and control characters made visible or removed."""
    for marker, text in _TOKEN_MARKERS.items():
        token = token.replace(marker, text)
    token = token.replace("\n", "\\n").replace("\t", "\\t").strip(" ")
    return token or "␣"


def layer_axis_label(causal: bool | None) -> str:
    """``"decoder layer"`` for causal models, ``"layer"`` otherwise (encoders, unknown)."""
    return "decoder layer" if causal else "layer"


def _token_ticks(ax, tokens: list[str] | None, length: int, max_labels: int = 48) -> None:
    if tokens is None or length > max_labels:
        return
    ax.set_xticks(range(length))
    ax.set_xticklabels([clean_token(t) for t in tokens[:length]], rotation=90, fontsize=7)


def massive_activations_figure(report: Any, batch: int = 0):
    """Per layer: sequence ``batch``'s top-k |activation| values, the median |activation| and both thresholds
    (``magnitude_threshold`` and ``ratio_threshold`` x median), log scale, as in Sun et al. Fig. 1."""
    data = _as_dict(report)
    layers = [s["layer"] for s in data["layers"]]
    tops = [[e for e in s["top"] if e.get("batch", 0) == batch] for s in data["layers"]]
    medians = np.asarray([s["median"] for s in data["layers"]], dtype=float)
    k = max((len(top) for top in tops), default=0)
    fig, ax = plt.subplots(figsize=(7, 3.8))
    for rank in range(k):
        values = [abs(top[rank]["value"]) if rank < len(top) else np.nan for top in tops]
        ax.plot(layers, values, marker="o", ms=3, label=f"top {rank + 1}")
    ax.plot(layers, medians, marker="o", ms=3, color="gray", label="median")
    ax.axhline(data["magnitude_threshold"], ls="--", lw=0.8, color="red", label="magnitude threshold")
    ax.plot(
        layers, data["ratio_threshold"] * medians, ls=":", lw=1.0, color="purple", label="ratio threshold x median"
    )
    ax.set_yscale("log")
    ax.set_xlabel(layer_axis_label(data.get("causal")))
    ax.set_ylabel("|activation|")
    features = data.get("repeated_features") or sorted(int(f) for f in data["features"])
    title = f"Largest residual-stream activations of sequence {batch} (massive features: {features[:6]})"
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    return fig


def default_head_layer(report: Any, batch: int = 0) -> int:
    """The layer of the strongest per-layer sink after the first valid key of sequence ``batch``, else the middle."""
    data = _as_dict(report)
    scores = data["layer_scores"][batch]
    first = next((k for k, b in enumerate(data["baseline"][batch]) if b > 0), 0) if "baseline" in data else 0
    best = None
    for sink in data.get("layer_sinks", []):
        if sink["batch"] != batch or sink["token"] == first:
            continue
        for layer, score in zip(sink["layers"], sink["scores"]):
            if best is None or score > best[1]:
                best = (layer, score)
    return best[0] if best is not None else len(scores) // 2


def attention_sinks_figure(report: Any, tokens: list[str] | None = None, batch: int = 0, layer: int | None = None):
    """Sink score per layer and key (mean over heads; per-layer sinks circled), and per head and key at ``layer``
    (default: [`default_head_layer`][peft_gnnmoe.analysis.plotting.default_head_layer])."""
    data = _as_dict(report)
    layer_scores = np.asarray(data["layer_scores"][batch], dtype=float)  # L, T
    scores = np.asarray(data["scores"][batch], dtype=float)  # L, H, T
    layer = default_head_layer(data, batch) if layer is None else layer
    if not 0 <= layer < scores.shape[0]:
        raise ValueError(f"layer {layer} does not exist: the report has {scores.shape[0]} layers.")
    label = layer_axis_label(data.get("causal"))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4), gridspec_kw={"width_ratios": [1.3, 1]})
    image = axes[0].imshow(layer_scores, aspect="auto", cmap="viridis", vmin=0, vmax=1)
    sinks = [(s["token"], at) for s in data.get("layer_sinks", []) if s["batch"] == batch for at in s["layers"]]
    if sinks:
        xs, ys = zip(*sinks)
        axes[0].scatter(xs, ys, s=14, facecolors="none", edgecolors="red", linewidths=0.8)
    axes[0].set_xlabel("key position")
    axes[0].set_ylabel(label)
    axes[0].set_title("attention received (mean over heads; red circles: sinks at that layer)", fontsize=9)
    _token_ticks(axes[0], tokens, layer_scores.shape[1])
    axes[1].imshow(scores[layer], aspect="auto", cmap="viridis", vmin=0, vmax=1)
    axes[1].set_xlabel("key position")
    axes[1].set_ylabel("head")
    axes[1].set_title(f"per head at {label} {layer}", fontsize=9)
    _token_ticks(axes[1], tokens, scores.shape[-1])
    fig.colorbar(image, ax=axes, shrink=0.8, label="sink score (mean attention received)")
    return fig


def bos_cosine_figure(report: Any, tokens: list[str] | None = None, batch: int = 0):
    """Cosine similarity to BOS per layer and token, and its per-layer mean over valid non-BOS tokens."""
    data = _as_dict(report)
    cosine = np.asarray([[np.nan if v is None else v for v in row] for row in data["cosine"][batch]], dtype=float)
    label = layer_axis_label(data.get("causal"))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4), gridspec_kw={"width_ratios": [1.6, 1]})
    image = axes[0].imshow(cosine, aspect="auto", cmap="coolwarm", vmin=-1, vmax=1)
    axes[0].set_yticks(range(len(data["layers"])))
    axes[0].set_yticklabels(data["layers"], fontsize=6)
    axes[0].set_xlabel("token position")
    axes[0].set_ylabel(label)
    axes[0].set_title(f"cos(h[BOS], h[t]) (BOS at {data['bos_positions'][batch]})", fontsize=9)
    _token_ticks(axes[0], tokens, cosine.shape[1])
    fig.colorbar(image, ax=axes[0], shrink=0.8, label="cosine similarity to BOS")
    axes[1].plot(data["layers"], data["mean_per_layer"], marker="o", ms=3)
    axes[1].set_xlabel(label)
    axes[1].set_ylabel("mean cosine to BOS")
    axes[1].set_title(f"mean over tokens (all layers: {data['mean']:.3f})", fontsize=9)
    return fig


def plot_massive_activations(report: Any, path: str | Path, batch: int = 0) -> Path:
    """Save [`massive_activations_figure`][peft_gnnmoe.analysis.plotting.massive_activations_figure] as a PNG."""
    return _save(massive_activations_figure(report, batch), path)


def plot_attention_sinks(
    report: Any, path: str | Path, tokens: list[str] | None = None, batch: int = 0, layer: int | None = None
) -> Path:
    """Save [`attention_sinks_figure`][peft_gnnmoe.analysis.plotting.attention_sinks_figure] as a PNG."""
    return _save(attention_sinks_figure(report, tokens, batch, layer), path)


def plot_bos_cosine(report: Any, path: str | Path, tokens: list[str] | None = None, batch: int = 0) -> Path:
    """Save [`bos_cosine_figure`][peft_gnnmoe.analysis.plotting.bos_cosine_figure] as a PNG."""
    return _save(bos_cosine_figure(report, tokens, batch), path)


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path

"""The sink experiment's per-model figures: one utterance's attention map with its BOS / audio / video / prompt /
transcript bands, and the cosine to BOS of sink tokens against the other tokens, layer by layer."""

from __future__ import annotations

from pathlib import Path

import torch

from ..pipeline.sequences import SEG, SEGMENTS

BAND_COLOURS = {
    "bos": "tab:red",
    "audio_delim": "tab:gray",
    "audio": "tab:blue",
    "video_delim": "tab:gray",
    "video": "tab:green",
    "prompt": "tab:orange",
    "transcript": "tab:purple",
    "eos": "tab:brown",
}


def is_bos_or_pad(segments: torch.Tensor, batch: int, token: int) -> bool:
    """Whether position ``token`` of sequence ``batch`` is BOS or padding (never an intermediate sink)."""
    return int(segments[batch, token]) in (SEG["bos"], SEG["pad"])


def _bands(segments: list[int]) -> list[tuple[str, int, int]]:
    """Consecutive runs ``(segment name, start, end)`` of one sequence's segment ids, padding left out."""
    runs: list[tuple[str, int, int]] = []
    for t, seg in enumerate(segments):
        name = SEGMENTS[seg]
        if runs and runs[-1][0] == name and runs[-1][2] == t:
            runs[-1] = (name, runs[-1][1], t + 1)
        else:
            runs.append((name, t, t + 1))
    return [r for r in runs if r[0] != "pad"]


def attention_map(llm, batch: dict, layer: int, row: int = 0) -> torch.Tensor:
    """Attention weights ``[T, T]`` (mean over heads) of sequence ``row`` at decoder ``layer``, eager attention."""
    from peft_gnnmoe.analysis.sinks import eager_attention

    one = {k: v[row : row + 1] for k, v in batch.items()}
    with torch.no_grad(), eager_attention(llm):
        out = llm(**one, output_attentions=True)
    return out.attentions[layer][0].float().mean(0)


def plot_attention_map(llm, batch: dict, segments: torch.Tensor, layer: int, path: Path, title: str = "") -> Path:
    """One utterance's attention map at ``layer`` (log colour scale), its token bands marked on both axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    valid = int(batch["attention_mask"][0].sum())
    weights = attention_map(llm, batch, layer)[:valid, :valid].clamp(min=1e-4).numpy()
    bands = _bands(segments[0, :valid].tolist())
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    image = ax.imshow(weights, cmap="magma", norm=LogNorm(vmin=1e-4, vmax=1))
    for name, start, end in bands:
        colour = BAND_COLOURS.get(name, "black")
        ax.axvspan(start - 0.5, end - 0.5, ymin=1.0, ymax=1.03, color=colour, clip_on=False)
        ax.axhspan(start - 0.5, end - 0.5, xmin=-0.03, xmax=0.0, color=colour, clip_on=False)
    handles = [plt.Rectangle((0, 0), 1, 1, color=BAND_COLOURS[n]) for n in dict.fromkeys(b[0] for b in bands)]
    ax.legend(handles, list(dict.fromkeys(b[0] for b in bands)), fontsize=7, loc="lower left")
    ax.set(xlabel="key position", ylabel="query position", title=title or f"attention at layer {layer}")
    fig.colorbar(image, ax=ax, shrink=0.8, label="attention weight (mean over heads)")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def sink_vs_other_cosine(cosine, sinks, segments: torch.Tensor) -> tuple[list[float | None], list[float | None]]:
    """Per layer, the mean cosine to BOS of intermediate sink tokens (non-BOS keys that are sinks at that layer)
    and of every other valid non-BOS token; None where a group is empty."""
    sink_at: set[tuple[int, int, int]] = {
        (s["batch"], s["token"], layer) for s in sinks.layer_sinks for layer in s["layers"]
    }
    sink_means, other_means = [], []
    for i, layer in enumerate(cosine.layers):
        groups: tuple[list[float], list[float]] = ([], [])
        for b, rows in enumerate(cosine.cosine):
            for t, value in enumerate(rows[i]):
                if value is None or is_bos_or_pad(segments, b, t):
                    continue
                groups[0 if (b, t, layer) in sink_at else 1].append(value)
        sink_means.append(sum(groups[0]) / len(groups[0]) if groups[0] else None)
        other_means.append(sum(groups[1]) / len(groups[1]) if groups[1] else None)
    return sink_means, other_means


def plot_sink_vs_other_cosine(sink_means: list, other_means: list, path: Path, title: str = "") -> Path:
    """The two per-layer curves of :func:`sink_vs_other_cosine`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    layers = range(len(sink_means))
    ax.plot(layers, [float("nan") if v is None else v for v in sink_means], "o-", ms=3, label="intermediate sinks")
    ax.plot(layers, [float("nan") if v is None else v for v in other_means], "s-", ms=3, label="other tokens")
    ax.set(xlabel="decoder layer", ylabel="mean cos(h[BOS], h[t])", title=title or "cosine to BOS", ylim=(-1, 1))
    ax.legend(fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path

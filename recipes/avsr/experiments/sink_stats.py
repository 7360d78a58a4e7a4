"""What the sink experiment measures in one model: cosine to BOS, attention sinks per layer, massive activations and
where they sit (BOS, modality delimiters, audio or video tokens, prompt, transcript)."""

from __future__ import annotations

from pathlib import Path

import torch

from ..data.loader import LoaderConfig, make_loader
from ..data.lrs3 import Utterance
from ..pipeline.model import AVSRModel
from ..pipeline.sequences import SEGMENTS
from ..reports.sink_plots import is_bos_or_pad, plot_attention_map, plot_sink_vs_other_cosine, sink_vs_other_cosine
from .options import SinkConfig

# Sun et al.'s thresholds (|h| > 100 and > 1000 x the layer median) are SinkConfig's; the relative count keeps only
# the ratio test, at 100 x, which also counts the smaller outliers of a small model
RELATIVE_RATIO = 100.0


def analysis_batch(model: AVSRModel, test_utts: list[Utterance], loader_config: LoaderConfig, extractor, n: int = 8):
    """Teacher-forced sequences of the first ``n`` test utterances, as forward kwargs for the analysis tools."""
    loader = make_loader(loader_config, test_utts[:n], model.modality, extractor, model.tokenizer, train=False)
    batch = next(iter(loader))
    with torch.no_grad():
        seq = model.assemble(batch, with_transcript=True)
    return {"inputs_embeds": seq.inputs_embeds, "attention_mask": seq.attention_mask}, seq.segments


def _by_segment(entries, segments: torch.Tensor) -> dict[str, int]:
    counts: dict[str, int] = {}
    for e in entries:
        name = SEGMENTS[segments[e["batch"], e["token"]]]
        counts[name] = counts.get(name, 0) + 1
    return counts


def sink_analysis(
    model: AVSRModel, batch: dict, segments: torch.Tensor, config: SinkConfig, plot_dir: Path, tag: str
) -> dict:
    """Cosine to BOS, intermediate sinks (on the mean over layers and per layer) and massive activations of one
    model, with its plots (``plot_dir/<tag>_*.png``)."""
    from peft_gnnmoe.analysis.cosine import bos_cosine_similarity
    from peft_gnnmoe.analysis.massive import find_massive_activations
    from peft_gnnmoe.analysis.plotting import plot_attention_sinks, plot_bos_cosine, plot_massive_activations
    from peft_gnnmoe.analysis.sinks import attention_sink_scores

    cosine = bos_cosine_similarity(model.llm, batch, layers="all")
    sinks = attention_sink_scores(model.llm, batch, threshold=config.threshold)
    massive = find_massive_activations(model.llm, batch, config.massive_magnitude, config.massive_ratio)
    relative = find_massive_activations(model.llm, batch, 0.0, RELATIVE_RATIO)
    n = batch["attention_mask"].shape[0]

    def not_bos(entry: dict) -> bool:
        return not is_bos_or_pad(segments, entry["batch"], entry["token"])

    intermediate = [s for s in sinks.sinks if not_bos(s)]
    n_layers = len(sinks.layer_scores[0]) if sinks.layer_scores else 0
    per_layer = [sum(layer in s["layers"] for s in sinks.layer_sinks if not_bos(s)) / n for layer in range(n_layers)]
    top_per_layer = [max((abs(t["value"]) for t in layer.top), default=0.0) for layer in massive.layers]
    names = [SEGMENTS[s] for s in segments[0].tolist()]
    plot_bos_cosine(cosine, plot_dir / f"{tag}_bos_cosine.png", tokens=names)
    plot_attention_sinks(sinks, plot_dir / f"{tag}_attention_sinks.png", tokens=names)
    plot_massive_activations(massive, plot_dir / f"{tag}_massive_activations.png")
    sink_cos, other_cos = sink_vs_other_cosine(cosine, sinks, segments)
    plot_sink_vs_other_cosine(sink_cos, other_cos, plot_dir / f"{tag}_sink_vs_other_cosine.png", tag)
    map_layer = max(range(n_layers), key=lambda i: per_layer[i]) if any(per_layer) else n_layers // 2
    plot_attention_map(
        model.llm, batch, segments, map_layer, plot_dir / f"{tag}_attention_map.png", f"{tag}: layer {map_layer}"
    )
    return {
        "mean_bos_cosine": cosine.mean,
        "bos_cosine_per_layer": cosine.mean_per_layer,
        "bos_cosine_of_sinks_per_layer": sink_cos,
        "bos_cosine_of_others_per_layer": other_cos,
        "attention_map_layer": map_layer,
        "intermediate_sinks_per_utt": round(len(intermediate) / n, 2),
        "intermediate_sinks_by_segment": _by_segment(intermediate, segments),
        "intermediate_sinks_per_layer": [round(v, 2) for v in per_layer],
        "layers_with_intermediate_sinks": sum(v > 0 for v in per_layer),
        "bos_sink_score": round(sum(row[0] for row in sinks.mean_scores) / n, 4),
        "max_intermediate_sink_score": round(
            sum(
                max((v for t, v in enumerate(row) if not is_bos_or_pad(segments, b, t)), default=0.0)
                for b, row in enumerate(sinks.mean_scores)
            )
            / n,
            4,
        ),
        "top_activation": round(max(top_per_layer, default=0.0), 2),
        "top_activation_per_layer": [round(v, 2) for v in top_per_layer],
        "max_layer_median": round(max((layer.median for layer in massive.layers), default=0.0), 4),
        "massive_activations": len(massive.massive),
        "massive_tokens_by_segment": _by_segment(massive.tokens, segments),
        "relative_massive_tokens_by_segment": _by_segment(relative.tokens, segments),
    }

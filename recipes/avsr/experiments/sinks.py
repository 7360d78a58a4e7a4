"""The sink paper's experiment (arXiv 2510.22603): at a low and a high compression rate, analyse the model before
fine-tuning, train it without and with the decorrelation loss, and measure BOS-cosine, attention sinks and massive
activations of each (:mod:`recipes.avsr.experiments.sink_stats`), over one or more seeds (``--seeds``).
"""

from __future__ import annotations

import json
from dataclasses import replace

from accelerate import Accelerator

from ..data.collate import matching_video_rate
from ..data.lrs3 import Utterance
from ..pipeline.build import build_model
from ..pipeline.config.cli import Entry
from ..pipeline.config.run import RunConfig
from ..pipeline.main import run_entry
from ..pipeline.run import run
from ..pipeline.training import Log
from ..reports.sink_report import write_report
from .options import SINK_DEFAULTS, SinkConfig, parse_experiment, sink_config
from .sink_stats import analysis_batch, sink_analysis

ENTRY = Entry(
    prog="recipes.avsr.experiments.sinks",
    description="The sink paper's experiment in miniature: at a low and a high rate, the model before fine-tuning, "
    "trained without and with the decorrelation loss, each analysed.",
    experiment="sinks",
    groups={"sink analysis": SinkConfig},
    defaults=SINK_DEFAULTS,
)


def main(argv: list[str] | None = None) -> dict:
    """``python -m recipes.avsr.experiments.sinks [options]``; returns ``{}`` (the report is written to
    ``output_dir/sinks``)."""
    config, values, given = parse_experiment(argv, ENTRY)
    sinks = sink_config(config, values, given)
    if values["print"]:
        from ..pipeline.config.cli import config_json

        print(config_json({"run": config, "sinks": sinks}))
        raise SystemExit(0)
    refuse_dropping_other_seeds(config)
    run_entry(config, lambda c, accelerator, splits, log: run_sink_experiment(c, sinks, accelerator, splits, log))
    return {}


def refuse_dropping_other_seeds(config: RunConfig) -> None:
    """Raise when ``output_dir/sinks/sinks.json`` holds seeds this run does not train: its report would replace
    them (a second ``--seeds S`` run into the same folder). Called before the corpus and the trainings."""
    saved = config.output_dir / "sinks" / "sinks.json"
    if not saved.is_file():
        return
    other = sorted({row["seed"] for row in json.loads(saved.read_text())} - set(config.seeds or (config.seed,)))
    if other:
        raise ValueError(
            f"{saved} holds seeds {other} of an earlier run, and this run's report would replace it: pass another "
            "--output_dir, then merge both with python -m recipes.avsr.experiments.merge_sinks RUN RUN --output DIR"
        )


def run_sink_experiment(
    config: RunConfig, sinks: SinkConfig, accelerator: Accelerator, splits: dict[str, list[Utterance]], log: Log
) -> None:
    """Per seed and rate: analyse the model before fine-tuning, then train it without and with the decorrelation
    loss and analyse each; write ``sinks.json`` (every row), ``summary.json`` / ``sinks.md`` (mean ± std over seeds)
    and the plots."""
    from transformers import set_seed

    modality = config.modalities[0]
    weight = sinks.weight
    out = config.output_dir / "sinks"
    seeds = config.seeds or (config.seed,)
    rows = []
    for seed in seeds:
        seeded = replace(config, seed=seed)
        base = out / f"seed_{seed}" if config.seeds else out
        for rate in sinks.rates:
            rates = rate_overrides(modality, rate)
            set_seed(seed)  # the same initial projectors as the trained runs of this seed start from
            untrained, extractor = build_model(replace(config.model, decor_weight=0.0, **rates), modality)
            untrained.to(accelerator.device)
            tag = f"{modality}_rate{rate}_before"
            batch, segments = analysis_batch(untrained, splits["test"], config.loader, extractor)
            stats = sink_analysis(untrained, batch, segments, sinks, base / "plots", tag)
            rows.append({"tag": tag, "seed": seed, "rate": rate, "stage": "before", "decor_weight": None, **stats})
            del untrained
            for w in (0.0, weight):
                tag = f"{modality}_rate{rate}_decor{w:g}"
                model_config = replace(config.model, decor_weight=w, **rates)
                res, model, extractor = run(seeded, accelerator, splits, modality, base / tag, log, model_config)
                batch, segments = analysis_batch(model, splits["test"], config.loader, extractor)
                stats = sink_analysis(model, batch, segments, sinks, base / "plots", tag)
                rows.append(
                    {
                        "tag": tag,
                        "seed": seed,
                        "rate": rate,
                        "stage": "trained",
                        "decor_weight": w,
                        "wer": res["test"]["wer"],
                        "untrained_wer": res.get("untrained", {}).get("wer"),
                        **stats,
                    }
                )
                log(
                    f"[sinks] seed {seed} {tag}: WER {res['test']['wer']:.2f}%  BOS-cos {stats['mean_bos_cosine']:.3f}"
                    f"  sinks/utt {stats['intermediate_sinks_per_utt']}  top |h| {stats['top_activation']}"
                )
    if not accelerator.is_main_process:
        return
    table = write_report(rows, out, modality, config.model.projector, weight, config.model.llm)
    log(table.rstrip("\n"))


def rate_overrides(modality: str, rate: int) -> dict[str, int]:
    """The ``ModelConfig`` rates that put the analysed modality at ``rate`` frames per LLM token (audio for asr and
    avsr, video for vsr; avsr's video at about the audio tokens' rate)."""
    rates = {"video_rate": rate} if modality == "vsr" else {"audio_rate": rate}
    if modality == "avsr":
        rates["video_rate"] = matching_video_rate(rate)
    return rates


if __name__ == "__main__":
    main()

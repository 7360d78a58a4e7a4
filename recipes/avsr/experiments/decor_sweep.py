"""Choosing the decorrelation weight λ on validation data (``python -m recipes.avsr.experiments.decor_sweep``).

At the high compression rate of ``--sink_rates`` (where the sink paper sees the loss matter), train once per λ of
``--decor_weights`` (0 is the baseline) and measure the teacher-forced loss on ``--val_utts`` held-out *training*
utterances (the CE alone: the decorrelation term is only added in training mode). The λ of lowest final validation
loss, averaged over ``--seeds``, is the chosen one; the test WER and the sink statistics of every λ are reported
next to it but play no part in the choice. Writes ``decor_sweep/sweep.json``, ``sweep.md`` and ``sweep.png``.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from accelerate import Accelerator

from ..data.lrs3 import Utterance
from ..pipeline.config.cli import Entry, config_json
from ..pipeline.config.run import RunConfig
from ..pipeline.main import run_entry
from ..pipeline.run import run
from ..pipeline.training import Log
from ..reports.sweep_report import plot_sweep, sweep_table
from ..reports.sweep_summary import summarise_sweep
from .options import SINK_DEFAULTS, SinkConfig, SweepConfig, parse_experiment, sink_config
from .sink_stats import analysis_batch, sink_analysis
from .sinks import rate_overrides

DECOR_SWEEP_VAL_UTTS = 64  # held-out training utterances that choose lambda
ENTRY = Entry(
    prog="recipes.avsr.experiments.decor_sweep",
    description="Choose the sink decorrelation weight lambda on held-out training utterances: one model per lambda "
    "at the high rate of --sink_rates, the lambda of lowest validation loss chosen.",
    experiment="decor_sweep",
    groups={"sink analysis": SinkConfig, "sweep": SweepConfig},
    defaults={**SINK_DEFAULTS, "val_utts": DECOR_SWEEP_VAL_UTTS},
)


def main(argv: list[str] | None = None) -> dict:
    """``python -m recipes.avsr.experiments.decor_sweep [options]``; returns the sweep's summary (main process)."""
    config, values, given = parse_experiment(argv, ENTRY)
    if config.model.decor_weight:
        raise ValueError(
            "the decor_sweep experiment trains one run per --decor_weights lambda; --decor_weight would be ignored: "
            "drop it, or list it in --decor_weights"
        )
    sinks = sink_config(config, values, given)
    sweep = SweepConfig(**({"weights": values["weights"]} if "weights" in given else {}))
    if values["print"]:
        print(config_json({"run": config, "sinks": sinks, "sweep": sweep}))
        raise SystemExit(0)

    def body(config: RunConfig, accelerator, splits: dict, log: Log) -> dict:
        return run_decor_sweep(config, sinks, sweep, accelerator, splits, log) or {}

    return run_entry(config, body)


def run_decor_sweep(
    config: RunConfig,
    sinks: SinkConfig,
    sweep: SweepConfig,
    accelerator: Accelerator,
    splits: dict[str, list[Utterance]],
    log: Log,
) -> dict | None:
    """Train and analyse one model per (seed, λ); returns the summary (main process) with the ``chosen`` λ."""
    modality = config.modalities[0]
    rate = sinks.rates[1]
    rates = rate_overrides(modality, rate)
    out = config.output_dir / "decor_sweep"
    seeds = config.seeds or (config.seed,)
    rows = []
    for seed in seeds:
        for weight in sweep.weights:
            tag = f"{modality}_rate{rate}_decor{weight:g}"
            run_dir = out / f"seed_{seed}" / tag
            model_config = replace(config.model, decor_weight=weight, **rates)
            res, model, extractor = run(
                replace(config, seed=seed), accelerator, splits, modality, run_dir, log, model_config
            )
            batch, segments = analysis_batch(model, splits["test"], config.loader, extractor)
            stats = sink_analysis(model, batch, segments, sinks, run_dir / "plots", tag)
            # train_log.json is written by the main process only (the other processes' rows are never used)
            val = _final_validation_loss(run_dir) if accelerator.is_main_process else None
            rows.append(
                {
                    "seed": seed,
                    "rate": rate,
                    "decor_weight": weight,
                    "val_loss": val,
                    "wer": res["test"]["wer"],
                    "mean_bos_cosine": stats["mean_bos_cosine"],
                    "top_activation": stats["top_activation"],
                    "massive_activations": stats["massive_activations"],
                    "layers_with_sinks": stats["layers_with_intermediate_sinks"],
                    "massive_tokens_by_segment": stats["massive_tokens_by_segment"],
                }
            )
            log(f"[decor_sweep] seed {seed} λ={weight:g}: validation loss {val}, test WER {res['test']['wer']:.2f}%")
            del model
    if not accelerator.is_main_process:
        return None
    summary = summarise_sweep(rows)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.json").write_text(json.dumps(summary, indent=1))
    table = sweep_table(summary, modality)
    (out / "sweep.md").write_text(table)
    plot_sweep(summary, out / "sweep.png")
    log(table.rstrip("\n"))
    return summary


def _final_validation_loss(run_dir: Path) -> float:
    """The validation loss after the last epoch, from the run's ``train_log.json``."""
    history = json.loads((run_dir / "train_log.json").read_text())
    losses = [h["val_loss"] for h in history if "val_loss" in h]
    if not losses:
        raise RuntimeError(f"{run_dir} logged no validation loss: the sweep needs --val_utts > 0")
    return losses[-1]


if __name__ == "__main__":
    main()

"""Entry point of the AVSR recipe: build the data and (embedded) models, then train and decode every modality.

    accelerate launch -m recipes.avsr                       # embedded default: offline corpus, asr + vsr + avsr
    accelerate launch -m recipes.avsr --real                # Whisper tiny.en + SmolLM2-135M, asr, Llama-AVSR's noise
    accelerate launch -m recipes.avsr --seeds 0 1 2 --swap_controls   # mean +- std over seeds, with swap controls
    accelerate launch -m recipes.avsr --modality avsr --data_dir /data/lrs3 --llm meta-llama/Llama-3.2-1B \\
        --audio_encoder openai/whisper-medium --video_encoder path/to/lip_encoder --preset llama_avsr \\
        --decor_weight 0.1 --output_dir runs/avsr
    python -m recipes.avsr --preset real --print             # the resolved configuration, as JSON

Without ``--data_dir`` the recipe synthesises a small GRID-like corpus (espeak-ng speech + phoneme-timed mouth
video, written in the auto_avsr LRS3 layout), builds small stand-ins for the pretrained checkpoints (Whisper and lip
encoders trained with word-level CTC, a Llama trained as a language model, all on the training split only), then
trains projectors + LoRA and decodes every modality. Each run writes ``results.json`` / ``results.md`` (with the chance
level of the test set: :mod:`recipes.avsr.pipeline.controls`), the decoded transcripts, and the adapter + projector
weights (safetensors). The experiments are entry points of their own: :mod:`recipes.avsr.experiments`.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from typing import Any

from ..reports.results_table import results_table
from ..reports.seed_report import seed_summary, write_seed_report
from .config.cli import parse_config
from .config.run import RunConfig
from .run import evaluate_final, run
from .splits import prepare_data
from .training import Log, make_accelerator


def main(argv: list[str] | None = None) -> dict:
    """Run the recipe; returns ``{modality: results}``."""
    return run_entry(parse_config(argv), run_recipe)


def run_entry(config: RunConfig, body: Callable[[RunConfig, Any, dict, Log], Any]) -> Any:
    """Make the accelerator and the data of ``config``, run ``body(config, accelerator, splits, log)``, end cleanly."""
    accelerator = make_accelerator(config.train, config.output_dir)
    config.output_dir.mkdir(parents=True, exist_ok=True)

    def log(msg: str) -> None:
        if accelerator.is_main_process:
            print(msg, flush=True)

    result = body(config, accelerator, prepare_data(config, accelerator, log), log)
    accelerator.wait_for_everyone()  # every rank done, then the process group torn down, not left to interpreter exit
    accelerator.end_training()
    return result


def run_recipe(config: RunConfig, accelerator, splits: dict, log: Log) -> dict:
    """Train and decode every modality (or decode a finished run, ``--eval_only``); write the results table."""
    out = config.output_dir
    if config.eval_only:
        results = [evaluate_final(config, accelerator, splits, out / "eval", log)]
    elif config.seeds:
        return run_seeds(config, accelerator, splits, log)
    else:
        results = [run(config, accelerator, splits, m, out / m, log)[0] for m in config.modalities]
    table = results_table(results)
    (out / "results.md").write_text(table)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    log("\n" + table)
    return {r["modality"]: r for r in results}


def run_seeds(config: RunConfig, accelerator, splits: dict, log: Log) -> dict:
    """``--seeds``: every modality once per seed in ``output_dir/seed_<S>/<modality>``, on the same corpus and
    stand-ins (those of ``--seed``); writes the seed report (:func:`~recipes.avsr.reports.seed_report.
    write_seed_report`: mean ± std, avsr against each single stream) and logs it. Returns ``{modality: summary}``."""
    runs = []
    for seed in config.seeds:
        seeded = dataclasses.replace(config, seed=seed)
        for m in config.modalities:
            result = run(seeded, accelerator, splits, m, config.output_dir / f"seed_{seed}" / m, log)[0]
            runs.append({"seed": seed, **result})
    if accelerator.is_main_process:
        log("\n" + write_seed_report(config.output_dir, config.seeds, config.seed, runs))
    return seed_summary(runs)

"""One AVSR run: build the model, (decode it untrained), train projectors + LoRA, decode and score, save."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from accelerate import Accelerator

from ..data.loader import make_loader
from ..data.lrs3 import Utterance
from .averaging import load_average_of_last
from .build import build_model
from .config.model import ModelConfig
from .config.run import RunConfig
from .evaluation import decode, score
from .model import AVSRModel
from .scoring import beams, describe, evaluate_model, write_results
from .training import Log, train
from .weights import load_final, read_run, save_final


def run(
    config: RunConfig,
    accelerator: Accelerator,
    splits: dict[str, list[Utterance]],
    modality: str,
    run_dir: Path,
    log: Log,
    model_config: ModelConfig | None = None,
) -> tuple[dict, AVSRModel, object]:
    """Train and evaluate one configuration (``model_config``, default ``config.model``).

    Writes ``run_dir/results.{json,md}``, ``decodes.jsonl``, ``train_log.json`` and ``final/`` (see
    :mod:`~recipes.avsr.pipeline.weights`), and returns ``(results, model, feature_extractor)``: the trained model
    and its audio feature extractor (None without audio) feed the sink analysis.
    """
    from transformers import set_seed

    model_config = model_config or config.model
    set_seed(config.seed)
    model, extractor = build_model(model_config, modality)
    tokenizer = model.tokenizer
    train_utts, val_utts = split_validation(splits["train"], config.train.val_utts)
    train_loader = make_loader(
        config.loader, train_utts, modality, extractor, tokenizer, True, config.seed, babble_from=train_utts
    )
    test_loader = make_loader(
        config.loader, splits["test"], modality, extractor, tokenizer, False, babble_from=train_utts
    )
    val_loader = None
    if val_utts:  # clean, like the training split it comes from (the test noise is for the test set)
        clean = dataclasses.replace(config.loader, test_snr_db=None)
        val_loader = make_loader(clean, val_utts, modality, extractor, tokenizer, False)
    run_dir.mkdir(parents=True, exist_ok=True)

    results = {**describe(model_config, modality), "seed": config.seed}
    skipped = {**train_loader.dataset.bad, **test_loader.dataset.bad}
    if config.eval.eval_untrained:  # also when resuming: the model is still untrained here
        desc = f"decode untrained {modality}"
        rows = decode(accelerator, model, test_loader, desc, skipped=skipped, **beams(config))
        results["untrained"] = score(rows)
        log(f"[{modality}] untrained WER {results['untrained']['wer']:.1f}%")
    results["training"] = train(
        config.train, accelerator, model, train_loader, run_dir, modality, log, skipped, val_loader
    )
    if config.train.average_last:
        used = load_average_of_last(accelerator.unwrap_model(model), run_dir, config.train.average_last)
        results["training"]["averaged"] = [p.name for p in used]
        log(f"[{modality}] final weights: the average of {', '.join(p.name for p in used)}")
    rows = evaluate_model(
        results, config, accelerator, model, extractor, splits, test_loader, train_utts, run_dir, log, skipped
    )
    if accelerator.is_main_process:
        save_final(accelerator.unwrap_model(model), run_dir / "final", model_config, modality)
        history = results["training"].pop("history")
        (run_dir / "train_log.json").write_text(json.dumps(history))
        write_results(results, rows, run_dir)
    accelerator.free_memory()  # the next run prepares its own model, optimizer and loaders on the same accelerator
    return results, accelerator.unwrap_model(model), extractor


def evaluate_final(
    config: RunConfig, accelerator: Accelerator, splits: dict[str, list[Utterance]], run_dir: Path, log: Log
) -> dict:
    """``--eval_only``: rebuild the model of ``config.resume_from`` (a finished run's ``final/``), decode the test
    split and write ``run_dir/results.{json,md}`` and ``decodes.jsonl``."""
    from transformers import set_seed

    modality, model_config = read_run(config.resume_from)
    set_seed(config.seed)
    model, extractor = build_model(model_config, modality)
    load_final(model, config.resume_from)
    model.to(accelerator.device)
    test_loader = make_loader(
        config.loader, splits["test"], modality, extractor, model.tokenizer, False, babble_from=splits["train"]
    )
    run_dir.mkdir(parents=True, exist_ok=True)
    results = {**describe(model_config, modality), "resumed_from": str(config.resume_from)}
    skipped = dict(test_loader.dataset.bad)
    rows = evaluate_model(
        results, config, accelerator, model, extractor, splits, test_loader, splits["train"], run_dir, log, skipped
    )
    if accelerator.is_main_process:
        write_results(results, rows, run_dir)
    return results


def split_validation(train: list[Utterance], n: int) -> tuple[list[Utterance], list[Utterance]]:
    """The training utterances without the last ``n``, and those ``n`` (held out for the validation loss)."""
    if n >= len(train):
        raise ValueError(f"--val_utts {n} would leave no training utterance (the split has {len(train)})")
    return (train[:-n], train[-n:]) if n else (train, [])

"""The evaluation tail every decoded model goes through: score, CTC reading, controls, noisy and recorded tests."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

from accelerate import Accelerator

from ..data.loader import make_loader
from ..reports.results_table import results_table
from .config.model import ModelConfig
from .config.run import RunConfig
from .controls import chance_baseline
from .evaluation import decode, score, swap_controls
from .model import AVSRModel

Log = Callable[[str], None]


def evaluate_model(
    results: dict,
    config: RunConfig,
    accelerator: Accelerator,
    model,
    extractor,
    splits: dict,
    test_loader,
    train_utts: list,
    run_dir: Path,
    log: Log,
    skipped: dict,
) -> list[dict]:
    """Decode the test set and fill ``results``: test WER, CTC reading, chance level and swaps, noisy test sets,
    recorded speech; returns the decoded rows. ``train_utts`` feed the chance level and the babble noise."""
    modality = results["modality"]
    rows = decode(accelerator, model, test_loader, f"decode {modality}", skipped=skipped, **beams(config))
    _finish(results, rows, skipped, accelerator, modality, log)
    _ctc_test(results, accelerator, model, test_loader, log)
    _controls(results, config, accelerator, model, test_loader, train_utts, rows, skipped, log)
    _noisy_tests(results, config, accelerator, model, extractor, splits["test"], train_utts, run_dir, log)
    _real_speech(results, config, accelerator, model, extractor, splits, run_dir, log)
    return rows


def beams(config: RunConfig) -> dict[str, int]:
    """The decoding keywords of a run."""
    return {"num_beams": config.eval.num_beams, "max_new_tokens": config.eval.max_new_tokens}


def _ctc_test(results, accelerator, model, test_loader, log) -> None:
    """With the CTC alignment loss: ``results["ctc_test"]``, the WER of what the projector spells on its own."""
    if accelerator.unwrap_model(model).ctc_head is None:
        return
    desc = f"decode {results['modality']} (CTC)"
    results["ctc_test"] = score(decode(accelerator, model, test_loader, desc, read=AVSRModel.ctc_transcripts))
    log(f"[{results['modality']}] test WER of the projector's own CTC reading: {results['ctc_test']['wer']:.2f}%")


def _controls(results, config: RunConfig, accelerator, model, test_loader, train_utts, rows, skipped, log) -> None:
    """The chance level of the test set and, with ``--swap_controls``, the WERs with swapped streams."""
    modality = results["modality"]
    results["chance"] = chance_baseline([u.text for u in train_utts], [r["ref"] for r in rows])
    log(f"[{modality}] chance WER {results['chance']['wer']:.2f}% (a constant transcript from the training split)")
    if config.eval.swap_controls:
        swaps = swap_controls(
            accelerator, model, test_loader, modality, config.eval.swap_seed, skipped, **beams(config)
        )
        results.update(swaps)
        log(f"[{modality}] swap controls: " + ", ".join(f"{k} {v:.2f}%" for k, v in swaps.items()))


def _noisy_tests(results, config: RunConfig, accelerator, model, extractor, test, babble_from, run_dir, log) -> None:
    """``--test_snrs``: the test set decoded again with ``config.loader.test_noise`` at each SNR (the noise of an
    utterance is fixed by its uid, so every model hears the same); ``results["test_by_snr"]`` and
    ``decodes_snr_<S>.jsonl``. Video-only runs have no audio to add noise to: skipped."""
    modality = results["modality"]
    if not config.eval.test_snrs or modality == "vsr":
        return
    by_snr = {}
    for snr in config.eval.test_snrs:
        noisy = dataclasses.replace(config.loader, test_snr_db=snr)
        loader = make_loader(noisy, test, modality, extractor, model.tokenizer, False, babble_from=babble_from)
        with accelerator.unwrap_model(model).feature_cache_paused():  # the cache holds these uids' clean features
            rows = decode(accelerator, model, loader, f"decode {modality} at {snr:g} dB", **beams(config))
        by_snr[f"{snr:g}"] = score(rows)
        log(f"[{modality}] test WER at {snr:g} dB SNR ({config.loader.test_noise}): {by_snr[f'{snr:g}']['wer']:.2f}%")
        if accelerator.is_main_process:
            with open(run_dir / f"decodes_snr_{snr:g}.jsonl", "w", encoding="utf-8") as f:
                f.writelines(json.dumps(r) + "\n" for r in rows)
    results["test_by_snr"] = {"noise": config.loader.test_noise, "snr_db": by_snr}


def _real_speech(results, config: RunConfig, accelerator, model, extractor, splits, run_dir: Path, log) -> None:
    """``--real_speech_test`` (asr runs): decode the recorded utterances too; ``results["real_speech"]`` and
    ``decodes_real_speech.jsonl``. Ten utterances of two speakers, outside the embedded grammar's vocabulary."""
    if "real_speech" not in splits or results["modality"] != "asr":
        return
    clean = dataclasses.replace(config.loader, test_snr_db=None)  # the recordings as recorded
    loader = make_loader(clean, splits["real_speech"], "asr", extractor, model.tokenizer, False)
    rows = decode(accelerator, model, loader, "decode recorded speech", **beams(config))
    results["real_speech"] = score(rows)
    log(f"[asr] recorded-speech WER {results['real_speech']['wer']:.2f}% ({results['real_speech']['n']} utterances)")
    if accelerator.is_main_process:
        with open(run_dir / "decodes_real_speech.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)


def describe(model_config: ModelConfig, modality: str) -> dict:
    return {
        "modality": modality,
        "audio_rate": model_config.audio_rate if modality != "vsr" else None,
        "video_rate": model_config.video_rate if modality != "asr" else None,
        "projector": model_config.projector,
        "decor_weight": model_config.decor_weight,
        "llm": model_config.llm,
        **({"ctc_weight": model_config.ctc_weight} if model_config.ctc_weight else {}),  # absent: no CTC loss
    }


def _finish(results: dict, rows: list[dict], skipped: dict, accelerator: Accelerator, modality: str, log: Log) -> None:
    """Score the decodes and count the skipped files of every process."""
    from accelerate.utils import gather_object

    results["test"] = score(rows)
    if accelerator.num_processes > 1:
        skipped = {k: v for part in gather_object([skipped]) for k, v in part.items()}
    results["skipped_files"] = {"count": len(skipped), "examples": dict(list(skipped.items())[:10])}
    log(
        f"[{modality}] test WER {results['test']['wer']:.2f}%  CER {results['test']['cer']:.2f}%  "
        f"({results['test']['n']} utterances, {len(skipped)} skipped)"
    )


def write_results(results: dict, rows: list[dict], run_dir: Path) -> None:
    with open(run_dir / "decodes.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    (run_dir / "results.json").write_text(json.dumps(results, indent=1))
    (run_dir / "results.md").write_text(results_table([results]))

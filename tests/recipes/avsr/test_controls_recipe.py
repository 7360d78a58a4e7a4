"""AVSR recipe end to end with the controls: seeds, swaps, chance level, --eval_only, averaging, validation, noise."""

import json
import statistics

import pytest
import torch
from safetensors.torch import load_file

from recipes.avsr.pipeline.main import main


@pytest.mark.slow
def test_seeds_report_mean_and_std_with_chance_and_swaps_and_eval_only_reproduces_them(tmp_path, small, prepare_run):
    out = prepare_run(tmp_path / "run")
    args = small("--output_dir", str(out), "--modality", "avsr", "--max_steps", "2", "--no-eval_untrained")
    main(args + ["--seeds", "0", "1", "--swap_controls", "--test_snrs", "0"])
    saved = json.loads((out / "results.json").read_text())
    runs = saved["runs"]
    assert [r["seed"] for r in runs] == [0, 1]
    assert saved["data_seed"] == 0
    summary = saved["summary"]["avsr"]
    assert summary["wer"]["mean"] == round(statistics.fmean(r["test"]["wer"] for r in runs), 2)
    assert summary["wer"]["std"] == round(statistics.stdev(r["test"]["wer"] for r in runs), 2)
    for field in ("wer_swap_video", "wer_swap_audio"):
        assert summary[field]["n"] == 2
    assert summary["chance_wer"]["mean"] == runs[0]["chance"]["wer"]  # the same corpus for every seed
    assert 0 < runs[0]["chance"]["wer"] <= 100
    assert "±" in (out / "results.md").read_text()
    noisy = [r["test_by_snr"] for r in runs]  # --test_snrs: the test set decoded again with white noise at 0 dB
    assert all(n["noise"] == "white" and n["snr_db"]["0"]["n"] == 4 for n in noisy)
    assert summary["wer_at_0_db"]["mean"] == round(statistics.fmean(n["snr_db"]["0"]["wer"] for n in noisy), 2)
    assert "WER at 0 dB %" in (out / "results.md").read_text()
    assert (out / "wer_by_snr.png").stat().st_size > 0
    assert len((out / "seed_0" / "avsr" / "decodes_snr_0.jsonl").read_text().splitlines()) == 4
    assert "| avsr |" in (out / "seed_1" / "avsr" / "results.md").read_text()
    first = load_file(out / "seed_0" / "avsr" / "final" / "projectors.safetensors")
    second = load_file(out / "seed_1" / "avsr" / "final" / "projectors.safetensors")
    assert any(not torch.equal(first[k], second[k]) for k in first)  # the seed changes the initialisation

    final = str(out / "seed_0" / "avsr" / "final")
    main(args + ["--eval_only", "--resume_from", final, "--swap_controls", "--test_snrs", "0"])
    again = json.loads((out / "eval" / "results.json").read_text())
    assert again["test"]["wer"] == runs[0]["test"]["wer"]
    assert again["test_by_snr"] == runs[0]["test_by_snr"]  # the noise of an utterance is fixed by its uid
    assert again["wer_swap_video"] == runs[0]["wer_swap_video"]
    assert again["wer_swap_audio"] == runs[0]["wer_swap_audio"]
    assert again["chance"] == runs[0]["chance"]


def _lora_key(trainable_key: str) -> str:
    """A trainable parameter's name as PEFT saves it in adapter_model.safetensors."""
    return trainable_key.removeprefix("llm.").replace(".default.", ".")


@pytest.mark.slow
def test_average_last_writes_the_mean_of_the_checkpoints_and_validation_is_logged_per_epoch(
    tmp_path, small, prepare_run
):
    out = prepare_run(tmp_path / "run")
    main(
        small("--output_dir", str(out), "--modality", "asr", "--epochs", "2", "--checkpointing_steps", "1")
        + ["--average_last", "2", "--val_utts", "4", "--no-eval_untrained", "--no-cache_features"]
        + ["--train_snr_range", "-5", "20", "--time_mask", "--decode_snr_target", "0", "--decode_noise", "babble"]
    )
    results = json.loads((out / "asr" / "results.json").read_text())
    steps = results["training"]["steps"]
    assert results["training"]["averaged"] == [f"step_{steps - 1}", f"step_{steps}"]
    saved = [
        load_file(out / "asr" / "checkpoints" / f"step_{s}" / "trainable_0.safetensors") for s in (steps - 1, steps)
    ]
    final = load_file(out / "asr" / "final" / "projectors.safetensors")
    final.update(load_file(out / "asr" / "final" / "adapter" / "adapter_model.safetensors"))
    assert any(k.startswith("audio_proj.") for k in saved[0])
    for key in saved[0]:
        name = key if key.startswith("audio_proj.") else _lora_key(key)
        mean = ((saved[0][key].double() + saved[1][key].double()) / 2).float()
        assert torch.equal(final[name], mean), key
    assert any(not torch.equal(saved[0][k], saved[1][k]) for k in saved[0])  # the average is not one of them
    log = json.loads((out / "asr" / "train_log.json").read_text())
    validation = [h for h in log if "val_loss" in h]
    assert [h["epoch"] for h in validation] == [0, 1]
    assert all(h["val_loss"] > 0 for h in validation)
    assert [h["step"] for h in log if "loss" in h] == list(range(1, steps + 1))
    assert results["test"]["n"] == 4

"""``python -m recipes.avsr.experiments.merge_seeds``: one mean ± std report from training runs of separate
processes."""

import json
import statistics

import pytest

from recipes.avsr.experiments.merge_seeds import main as merge_main
from recipes.avsr.pipeline.main import main

from .test_recipe import SMALL


def _run(out, *extra, models_from=None, steps: int = 1) -> None:
    """An asr training run; ``models_from``: a run whose stand-in models this one loads (the same LLM)."""
    models = []
    if models_from is not None:
        models = [f"--{m}={models_from / 'base_models' / m}" for m in ("llm", "audio_encoder")]
    main(SMALL + models + ["--output_dir", str(out), "--modality", "asr", "--max_steps", str(steps),
                           "--no-eval_untrained", "--test_snrs", "0", *extra])  # fmt: skip


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("seed_runs")
    _run(root / "plain")  # seed 0, a plain run: results.json is a list
    _run(root / "seeds", "--seeds", "1", "2", models_from=root / "plain")
    return root


@pytest.mark.slow
def test_a_plain_run_and_a_seeds_run_make_one_report(runs, tmp_path):
    table = merge_main([str(runs / "plain"), str(runs / "seeds"), "--output", str(tmp_path)])
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["seeds"] == [0, 1, 2] and saved["data_seed"] == 0
    own = (
        json.loads((runs / "plain" / "results.json").read_text())
        + json.loads((runs / "seeds" / "results.json").read_text())["runs"]
    )
    assert saved["runs"] == own
    summary = saved["summary"]["asr"]
    assert summary["wer"]["mean"] == round(statistics.fmean(r["test"]["wer"] for r in own), 2)
    assert summary["wer_at_0_db"]["n"] == 3
    assert " ± " in table and table == (tmp_path / "results.md").read_text()
    assert (tmp_path / "wer_by_snr.png").stat().st_size > 0  # the runs decoded a noisy test set too


@pytest.mark.slow
def test_a_seed_in_two_runs_is_refused(runs, tmp_path):
    with pytest.raises(ValueError, match="seed 0, asr is in both"):
        merge_main([str(runs / "plain"), str(runs / "plain"), "--output", str(tmp_path / "merged")])
    assert not (tmp_path / "merged").exists()


@pytest.mark.slow
def test_other_settings_or_another_corpus_are_refused(runs, tmp_path):
    _run(tmp_path / "longer", "--seeds", "3", models_from=runs / "plain", steps=2)
    with pytest.raises(ValueError, match=r"asr was run with other settings .*'steps': \(1, 2\)"):
        merge_main([str(runs / "plain"), str(tmp_path / "longer"), "--output", str(tmp_path / "merged")])
    _run(tmp_path / "other_corpus", "--seeds", "4", "--corpus_train", "20", models_from=runs / "plain")
    with pytest.raises(ValueError, match="different corpora"):
        merge_main([str(runs / "plain"), str(tmp_path / "other_corpus"), "--output", str(tmp_path / "merged")])
    assert not (tmp_path / "merged").exists()


def test_a_folder_without_a_training_run_is_named(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty: no results.json"):
        merge_main([str(tmp_path / "empty"), "--output", str(tmp_path / "merged")])

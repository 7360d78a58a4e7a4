"""``python -m recipes.avsr.experiments.merge_seeds``: one mean ± std report from training runs of separate
processes."""

import dataclasses
import json
import statistics

import pytest

from recipes.avsr.data.synthetic import SyntheticCorpusConfig
from recipes.avsr.experiments.merge_seeds import main as merge_main
from recipes.avsr.pipeline.main import main


@pytest.fixture(scope="module")
def runs(tmp_path_factory, small, prepare_run):
    """Two asr training runs of one step on one corpus: ``plain`` (seed 0, a plain run: results.json is a list) and
    ``seeds`` (``--seeds 1 2``), which loads the plain run's stand-in models (the same LLM, as merging requires)."""
    root = tmp_path_factory.mktemp("seed_runs")
    common = small("--modality", "asr", "--max_steps", "1", "--no-eval_untrained", "--test_snrs", "0")
    main(common + ["--output_dir", str(prepare_run(root / "plain"))])
    models = [f"--{m}={root / 'plain' / 'base_models' / m}" for m in ("llm", "audio_encoder")]
    main(common + models + ["--output_dir", str(prepare_run(root / "seeds", parts=("corpus",))), "--seeds", "1", "2"])
    return root


def _copy_of_seeds_run(runs, out, seeds: list[int], **training) -> None:
    """The ``seeds`` run's results.json and corpus stamp, in ``out``, as a run of ``seeds`` whose training record
    holds ``training`` instead: what merging reads of a run trained with other settings."""
    saved = json.loads((runs / "seeds" / "results.json").read_text())
    saved["runs"] = [{**r, "seed": s, "training": {**r["training"], **training}} for r, s in zip(saved["runs"], seeds)]
    (out / "corpus").mkdir(parents=True)
    (out / "corpus" / "corpus.json").write_text((runs / "seeds" / "corpus" / "corpus.json").read_text())
    (out / "results.json").write_text(json.dumps(saved))


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
    _copy_of_seeds_run(runs, tmp_path / "longer", [3, 4], steps=2)
    with pytest.raises(ValueError, match=r"asr was run with other settings .*'steps': \(1, 2\)"):
        merge_main([str(runs / "plain"), str(tmp_path / "longer"), "--output", str(tmp_path / "merged")])
    _copy_of_seeds_run(runs, tmp_path / "other_corpus", [5, 6])
    stamp = tmp_path / "other_corpus" / "corpus" / "corpus.json"
    other = SyntheticCorpusConfig(**{**json.loads(stamp.read_text())["config"], "n_train": 20})  # --corpus_train 20
    stamp.write_text(json.dumps({"fingerprint": other.fingerprint(), "config": dataclasses.asdict(other)}))
    with pytest.raises(ValueError, match="different corpora"):
        merge_main([str(runs / "plain"), str(tmp_path / "other_corpus"), "--output", str(tmp_path / "merged")])
    assert not (tmp_path / "merged").exists()
    _copy_of_seeds_run(runs, tmp_path / "same", [5, 6])  # the same records under new seeds: merged
    merge_main([str(runs / "plain"), str(tmp_path / "same"), "--output", str(tmp_path / "merged")])
    assert json.loads((tmp_path / "merged" / "results.json").read_text())["seeds"] == [0, 5, 6]


def test_a_folder_without_a_training_run_is_named(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty: no results.json"):
        merge_main([str(tmp_path / "empty"), "--output", str(tmp_path / "merged")])

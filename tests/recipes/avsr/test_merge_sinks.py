"""``python -m recipes.avsr.experiments.merge_sinks``: one report from sink-experiment runs of one seed each."""

import json
import shutil

import pytest

from recipes.avsr.experiments.merge_sinks import main as merge_main
from recipes.avsr.experiments.options import parse_experiment
from recipes.avsr.experiments.sinks import ENTRY, refuse_dropping_other_seeds
from recipes.avsr.experiments.sinks import main as sinks

pytestmark = pytest.mark.xdist_group("merge_sinks")  # one worker makes the module's sink runs once


@pytest.fixture(scope="module")
def sink_run(small, prepare_run):
    """``sink_run(out, seed, models_from=None)``: one seed of the sink experiment (rates 2 and 4, one step) in
    ``out``, on the small corpus; ``models_from``: a run whose stand-in models it loads (the same LLM, as merging
    requires), else its own copy of them."""

    def run(out, seed: int, models_from=None) -> None:
        models = []
        if models_from is not None:
            models = [f"--{m}={models_from / 'base_models' / m}" for m in ("llm", "audio_encoder")]
        if not out.exists():
            prepare_run(out, parts=("corpus",) if models_from is not None else ("corpus", "base_models"))
        sinks(small(*models, "--output_dir", str(out), "--modality", "asr", "--sink_rates", "2", "4",
                    "--decor_weight", "0.5", "--max_steps", "1", "--no-eval_untrained",
                    "--seeds", str(seed)))  # fmt: skip

    return run


@pytest.fixture(scope="module")
def runs(tmp_path_factory, sink_run):
    root = tmp_path_factory.mktemp("sink_runs")
    sink_run(root / "seed0", 0)
    sink_run(root / "seed1", 1, models_from=root / "seed0")
    return root


@pytest.mark.slow
def test_merging_runs_of_one_seed_each_reports_every_seed(runs, tmp_path):
    table = merge_main([str(runs / "seed0"), str(runs / "seed1" / "sinks"), "--output", str(tmp_path)])
    rows = json.loads((tmp_path / "sinks.json").read_text())
    own = [json.loads((runs / f"seed{s}" / "sinks" / "sinks.json").read_text()) for s in (0, 1)]
    assert rows == own[0] + own[1]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert all(cell["seeds"] == [0, 1] for cell in summary["cells"])
    wer = {(r["seed"], r["decor_weight"]): r["wer"] for r in rows if r["stage"] == "trained"}
    paired = next(p for p in summary["paired"] if p["field"] == "wer")
    assert paired["diffs"] == [wer[s, 0.5] - wer[s, 0.0] for s in (0, 1)] and paired["interval"] is not None
    assert " ± " in table and (tmp_path / "plots" / "summary.png").stat().st_size > 0


@pytest.mark.slow
def test_merging_one_run_reproduces_its_own_report(runs, tmp_path):
    merge_main([str(runs / "seed0"), "--output", str(tmp_path)])
    assert (tmp_path / "sinks.md").read_text() == (runs / "seed0" / "sinks" / "sinks.md").read_text()
    assert (tmp_path / "summary.json").read_text() == (runs / "seed0" / "sinks" / "summary.json").read_text()


@pytest.mark.slow
def test_a_seed_in_two_runs_is_refused(runs, tmp_path):
    with pytest.raises(ValueError, match="seed 0, asr_rate2_before is in both"):
        merge_main([str(runs / "seed0"), str(runs / "seed0"), "--output", str(tmp_path)])


@pytest.mark.slow
def test_runs_with_other_settings_are_refused(runs, tmp_path):
    """A copy of seed 1's run whose records say it trained 2 steps: what merging reads of a run with other settings
    (the records themselves: test_recipe.py)."""
    longer = tmp_path / "longer"
    shutil.copytree(runs / "seed1" / "sinks", longer / "sinks")
    cells = sorted((longer / "sinks" / "seed_1").glob("*/results.json"))
    assert len(cells) == 4  # two rates, with and without the loss
    for results in cells:
        saved = json.loads(results.read_text())
        results.write_text(json.dumps({**saved, "training": {**saved["training"], "steps": 2}}))
    with pytest.raises(ValueError, match=r"asr_rate2_decor0 was run with other settings .*'steps': \(1, 2\)"):
        merge_main([str(runs / "seed0"), str(longer), "--output", str(tmp_path / "merged")])
    assert not (tmp_path / "merged").exists()  # nothing written


def test_a_folder_without_a_sink_run_is_named(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty: no sinks/sinks.json"):
        merge_main([str(tmp_path / "empty"), "--output", str(tmp_path / "merged")])


@pytest.mark.slow
def test_a_second_seed_into_the_same_folder_is_refused_before_training(runs, sink_run, small):
    report = runs / "seed0" / "sinks" / "sinks.json"
    before = report.read_text()
    with pytest.raises(ValueError, match=r"holds seeds \[0\] of an earlier run.*merge_sinks"):
        sink_run(runs / "seed0", 1, models_from=runs / "seed0")
    assert report.read_text() == before  # seed 0's rows are kept
    assert not (runs / "seed0" / "sinks" / "seed_1").exists()  # refused before any training
    again = parse_experiment(small("--output_dir", str(runs / "seed0")), ENTRY)[0]
    refuse_dropping_other_seeds(again)  # the same seed again: its own rows, replaced by the new run's

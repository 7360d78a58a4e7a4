"""The sweep's choice of checkpoint to resume each run from."""

import pytest

from recipes.dg.resume import resume_point


def _checkpoint(run_dir, step):
    path = run_dir / "checkpoints" / f"step_{step}"
    path.mkdir(parents=True)
    (path / "trainer_state.json").write_text("{}")
    return path


def test_a_given_checkpoint_applies_to_its_own_run_only(tmp_path):
    run_a = tmp_path / "runs" / "lora" / "env0_trial0"
    run_b = tmp_path / "runs" / "lora" / "env1_trial0"
    a5 = _checkpoint(run_a, 5)
    a10 = _checkpoint(run_a, 10)
    b15 = _checkpoint(run_b, 15)
    assert resume_point(run_a, str(a5)) == a5.resolve()  # an older checkpoint of this run, on request
    assert resume_point(run_b, str(a5)) == b15  # another run of the sweep resumes from its own latest
    assert resume_point(run_a, "latest") == a10
    assert resume_point(run_a, None) is None
    assert resume_point(tmp_path / "runs" / "probe" / "env0_trial0", str(a5)) is None  # not started yet


def test_an_incomplete_checkpoint_of_the_run_is_an_error(tmp_path):
    run = tmp_path / "runs" / "lora" / "env0_trial0"
    _checkpoint(run, 5)
    incomplete = run / "checkpoints" / "step_10"
    incomplete.mkdir()
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        resume_point(run, str(incomplete))
    assert resume_point(run, "latest").name == "step_5"  # "latest" skips it

"""The recipes' shared checkpoints (recipes.common.checkpoints): atomic folders, the limit, resumption."""

import json

import pytest
from accelerate import Accelerator

from recipes.common.checkpoints import checkpoint_dirs, load_checkpoint, resolve_resume, save_checkpoint


@pytest.fixture
def accelerator():
    return Accelerator(cpu=True)


def test_the_limit_keeps_the_newest(tmp_path, accelerator):
    for step in (2, 4, 6):
        save_checkpoint(accelerator, tmp_path, step, {"step": step}, limit=2)
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["step_4", "step_6"]
    assert not list((tmp_path / "checkpoints").glob("*.tmp"))
    assert resolve_resume(tmp_path, "latest") == tmp_path / "checkpoints" / "step_6"
    assert load_checkpoint(accelerator, resolve_resume(tmp_path, "latest")) == {"step": 6}


def test_a_resumed_run_keeps_the_checkpoint_it_just_wrote(tmp_path, accelerator):
    for step in (2, 4, 6):  # a first run
        save_checkpoint(accelerator, tmp_path, step, {"step": step, "run": 1}, limit=None)
    # resumed from step_2 with a limit of one: its step_4 must survive the first run's step_6
    path = save_checkpoint(accelerator, tmp_path, 4, {"step": 4, "run": 2}, limit=1)
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["step_4"]
    assert json.loads((path / "trainer_state.json").read_text())["run"] == 2


def test_resume_of_a_folder_that_is_no_checkpoint_names_it(tmp_path):
    assert resolve_resume(tmp_path, "latest") is None
    assert resolve_resume(tmp_path, None) is None
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        resolve_resume(tmp_path, str(tmp_path / "checkpoints" / "step_9"))

"""Resuming a sweep: args.json files written before the options were renamed (commit 8c50205) still resume."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from recipes.dg import resume, train
from recipes.dg.data import ImageFolderDomain, image_list_digest

DATA = Path(__file__).parent / "data"
# the command line each file was written with, by the code of commit 8c50205 (old spellings)
OLD_SWEEPS = {
    "args_real_tier_8c50205.json": ["--tier", "real", "--max_steps", "120", "--seeds", "0", "1", "--lr", "2e-3"],
    "args_folder_8c50205.json": [
        *("--dataset", "PACS", "--data_dir", "/data/PACS", "--backbone", "google/vit-base-patch16-224-in21k"),
        *("--method", "gnnmoe", "lora", "--router", "gat", "--test_envs", "0", "1", "--seeds", "3"),
        *("--max_steps", "300", "--method_lr", "lora=5e-4", "--graph", "radius", "--graph_radius", "1.5"),
        *("--image_size", "112"),
    ],
}


def _protocol(name: str, argv: list[str]) -> dict:
    """The protocol a sweep started with ``argv`` records today (with the folder's image fingerprint)."""
    protocol = train.parse_args(argv).protocol()
    if "folder" in name:  # the two images the file was written with
        domain = ImageFolderDomain("/data/PACS/photo", ["dog/1.jpg", "horse/2.png"], np.array([0, 1]), 112)
        protocol["images"] = image_list_digest([domain])
    return protocol


@pytest.fixture(params=sorted(OLD_SWEEPS))
def old_sweep(request, tmp_path):
    shutil.copy(DATA / request.param, tmp_path / "args.json")
    return tmp_path, request.param, OLD_SWEEPS[request.param]


def test_an_old_args_json_resumes(old_sweep):
    folder, name, argv = old_sweep
    resume.check_resumable(str(folder), _protocol(name, argv), resuming=True)


def test_an_old_args_json_is_read_with_todays_names(old_sweep):
    folder, name, argv = old_sweep
    assert set(resume.read_protocol(folder / "args.json")) == set(_protocol(name, argv))


def test_an_old_args_json_still_refuses_another_protocol(old_sweep):
    folder, name, argv = old_sweep
    with pytest.raises(ValueError, match="'max_steps': \\(\\d+, 9\\)"):
        resume.check_resumable(str(folder), _protocol(name, [*argv, "--max_steps", "9"]), resuming=True)


def test_a_new_args_json_round_trips(tmp_path):
    cfg = train.parse_args(["--max_steps", "7", "--method_lr", "lora=5e-4"])
    resume.write_args_json(str(tmp_path), cfg.protocol(), cfg.flat())
    assert json.loads((tmp_path / "args.json").read_text())["protocol"]["max_steps"] == 7
    resume.check_resumable(str(tmp_path), cfg.protocol(), resuming=True)


def test_a_sweep_folder_is_not_reused_without_resume(tmp_path):
    shutil.copy(DATA / "args_real_tier_8c50205.json", tmp_path / "args.json")
    with pytest.raises(FileExistsError, match="--resume_from_checkpoint"):
        resume.check_resumable(str(tmp_path), {}, resuming=False)

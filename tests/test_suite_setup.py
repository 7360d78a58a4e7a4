"""The test suite's own set-up does what CONTRIBUTING.md says of it."""

import subprocess
import sys


def test_an_xdist_group_runs_on_one_worker(tmp_path):
    """``--dist loadgroup`` (pytest.ini) keeps an ``xdist_group`` on one worker: tests/conftest.py puts the tests that
    start several processes in one, and modules with expensive fixtures use it. pytest 9.2 broke this silently."""
    (tmp_path / "test_grouped.py").write_text(
        "import os\n"
        "import pytest\n\n"
        'pytestmark = pytest.mark.xdist_group("one")\n\n\n'
        '@pytest.mark.parametrize("i", range(6))\n'
        "def test_worker(i):\n"
        "    with open('workers.txt', 'a') as f:\n"
        "        f.write(os.environ['PYTEST_XDIST_WORKER'] + '\\n')\n"
    )
    argv = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "2", "--dist", "loadgroup"]
    run = subprocess.run([*argv, "test_grouped.py"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    workers = (tmp_path / "workers.txt").read_text().split()
    assert len(workers) == 6 and len(set(workers)) == 1, workers

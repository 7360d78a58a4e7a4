"""CI's dependency checks (CONTRIBUTING.md, "Dependencies"): the library's tests in a fresh venv against

- ``newest``: the newest releases that setup.py allows, what ``pip install peft-gnnmoe`` gives a user today (the
  drift alarm: a new release that breaks us shows up at the next landing, not on a user's machine);
- ``lowest``: the oldest releases setup.py allows (each lower bound of ``install_requires`` pinned with ``==``).

torch is shared from this environment in both (``scripts/fresh_venv.py``): only the installed CPU build is tested.

    python scripts/check_deps.py newest [--venv DIR]
"""

from __future__ import annotations

import argparse
import ast
import subprocess
import sys
import tempfile
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
LIBRARY_TESTS = ["tests/tuners", "tests/analysis", "tests/utils", "tests/test_package.py"]
SHARED = "torch"
TEST_TOOLS = ("pytest", "pytest-xdist")  # pytest.ini runs the tests on every core (-n auto)


def setup_literal(name: str):
    """The value of setup.py's top-level ``NAME = <literal>`` (read from its source, not from a possibly stale
    install); ``INSTALL_REQUIRES`` and ``EXTRAS_REQUIRE`` are such literals."""
    for node in ast.parse((ROOT / "setup.py").read_text()).body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == name:
            return ast.literal_eval(node.value)
    raise SystemExit(f"setup.py has no top-level {name} literal")


def install_requires() -> list[Requirement]:
    """setup.py's ``INSTALL_REQUIRES``."""
    return [Requirement(r) for r in setup_literal("INSTALL_REQUIRES")]


def test_tools() -> list[str]:
    """The ``[dev]`` requirements of ``TEST_TOOLS``, with setup.py's bounds (pytest's upper one, for one)."""
    return [r for r in setup_literal("EXTRAS_REQUIRE")["dev"] if canonicalize_name(Requirement(r).name) in TEST_TOOLS]


def lowest_pins(requirements: list[Requirement]) -> list[str]:
    """``name==X`` for the ``>=X`` bound of every requirement (one is required)."""
    pins = []
    for requirement in requirements:
        floors = [s.version for s in requirement.specifier if s.operator == ">="]
        if len(floors) != 1:
            raise SystemExit(f"{requirement} needs exactly one lower bound (>=) for the lowest check")
        pins.append(f"{requirement.name}=={floors[0]}")
    return pins


def _pins(text: str) -> dict[str, str]:
    """``name -> public version`` of the ``name==version`` lines of a freeze or lock (``+cpu`` labels dropped)."""
    found = {}
    for line in text.splitlines():
        name, sep, version = line.partition("==")
        if sep and not line.startswith("#"):
            found[canonicalize_name(name)] = Version(version.split()[0]).public
    return found


def lock_differences(python: str) -> list[str]:
    """``name lock -> here`` for the packages in ``python``'s environment whose version differs from the lock."""
    here = _pins(subprocess.run([python, "-m", "pip", "freeze"], capture_output=True, text=True, check=True).stdout)
    lock = _pins((ROOT / "requirements" / "constraints.txt").read_text())
    return [f"{name} {lock[name]} -> {v}" for name, v in sorted(here.items()) if lock.get(name, v) != v]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("kind", choices=("newest", "lowest"))
    parser.add_argument("--venv", type=Path, help="where to make the venv (default: a temporary folder)")
    args = parser.parse_args(argv)
    folder = args.venv or Path(tempfile.mkdtemp()) / args.kind
    python = subprocess.run(
        [sys.executable, ROOT / "scripts" / "fresh_venv.py", folder, "--share", SHARED],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    others = [r for r in install_requires() if canonicalize_name(r.name) != SHARED]
    wanted = [str(r) for r in others] if args.kind == "newest" else lowest_pins(others)
    print(f"[{args.kind}] installing into {folder}: {' '.join(wanted)}", flush=True)
    subprocess.run([python, "-m", "pip", "install", "-q", *wanted, *test_tools()], check=True)
    print(f"[{args.kind}] versions that differ from the lock: " + (", ".join(lock_differences(python)) or "none"))
    tests = subprocess.run([python, "-m", "pytest", "-q", "-p", "no:cacheprovider", *LIBRARY_TESTS], cwd=ROOT)
    if tests.returncode != 0:
        print(
            f"\n[{args.kind}] DEPENDENCY CHECK FAILED: the library's tests fail with the {args.kind} releases that "
            "setup.py allows (versions above). Fix the code, or bound the dependency in setup.py's "
            "install_requires with a comment naming the break (CONTRIBUTING.md, 'Dependencies').",
            flush=True,
        )
    else:
        print(f"[{args.kind}] the library's tests pass with the {args.kind} releases setup.py allows")
    return tests.returncode


if __name__ == "__main__":
    raise SystemExit(main())

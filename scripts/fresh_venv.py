"""Make a new virtual environment that reuses some of this interpreter's installed packages instead of installing them
again (torch is a multi-GB download on most machines).

    python scripts/fresh_venv.py DIR --share torch            # a venv with only torch (and what torch needs)
    python scripts/fresh_venv.py DIR --share-requirements-of dist/peft_gnnmoe-*.whl

The shared distributions are the closure of the named requirements over their own ``Requires-Dist`` (markers
evaluated, extras not followed), taken from this interpreter's environment. Their files are linked into
``DIR.shared`` (outside the venv) and that folder is put on the venv's path by a ``.pth`` file, after the venv's own
site-packages: pip in the venv sees them as installed and installs into the venv whatever else it needs (a newer
release of a shared package shadows it; pip never uninstalls outside the environment), nothing else of this
interpreter is visible, and this interpreter's own files are never modified. Never run ``pip install -U`` on a
shared package's name in the venv. Prints the venv's python.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import shutil
import subprocess
import venv
import zipfile
from email.parser import Parser
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name


def requirement_closure(names: list[str]) -> list[importlib.metadata.Distribution]:
    """The installed distributions of ``names`` and, recursively, of their unconditional requirements."""
    todo, seen, found = list(names), set(), []
    while todo:
        requirement = Requirement(todo.pop())
        key = canonicalize_name(requirement.name)
        if key in seen:
            continue
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
            continue
        seen.add(key)
        try:
            distribution = importlib.metadata.distribution(requirement.name)
        except importlib.metadata.PackageNotFoundError:
            raise SystemExit(f"{requirement.name} is not installed here, so it cannot be shared") from None
        found.append(distribution)
        todo += distribution.requires or []
    return found


def wheel_requirements(wheel: Path) -> list[str]:
    """The ``Requires-Dist`` entries of a wheel (those of its extras are dropped by their markers later)."""
    with zipfile.ZipFile(wheel) as archive:
        name = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        metadata = Parser().parsestr(archive.read(name).decode())
    return metadata.get_all("Requires-Dist") or []


def link_distributions(distributions: list[importlib.metadata.Distribution], shared: Path) -> None:
    """Link every top-level file or folder of ``distributions`` (their packages and ``.dist-info``) into ``shared``."""
    shared.mkdir(parents=True, exist_ok=True)
    for distribution in distributions:
        site = Path(distribution.locate_file(""))
        for top in {Path(f).parts[0] for f in distribution.files or []}:
            if top == ".." or top == "__pycache__" or (shared / top).exists():  # console scripts live in bin/
                continue
            if (site / top).exists():
                (shared / top).symlink_to(site / top)


def make_venv(folder: Path, distributions: list[importlib.metadata.Distribution]) -> Path:
    venv.EnvBuilder(with_pip=False, clear=True, symlinks=True).create(folder)  # pip is shared: see main()
    python = folder / "bin" / "python"
    shared = folder.with_name(folder.name + ".shared")
    if shared.exists():
        shutil.rmtree(shared)  # links only: removing them never touches what they point to
    link_distributions(distributions, shared)
    purelib = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    (Path(purelib) / "shared-from-parent.pth").write_text(str(shared.absolute()) + "\n")
    return python


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path, help="the new venv (replaced if it exists)")
    parser.add_argument("--share", nargs="*", default=[], help="requirements to share, e.g. torch")
    parser.add_argument("--share-requirements-of", type=Path, help="a wheel: share what it requires")
    args = parser.parse_args(argv)
    # this interpreter's pip, shared rather than installed by ensurepip, whose older setuptools would shadow a
    # shared newer one (torch 2.13 requires setuptools >= 77)
    names = ["pip", *args.share]
    if args.share_requirements_of is not None:
        names += wheel_requirements(args.share_requirements_of)
    python = make_venv(args.folder, requirement_closure(names))
    print(python)


if __name__ == "__main__":
    main()

"""Presets: named sets of option values, one JSON file each in ``recipes/avsr/presets/``.

``embedded`` applies without ``--data_dir`` (the embedded corpus and its stand-in models), then the presets named by
``--preset`` (``--real`` is ``--preset real``), in order; a flag given on the command line always wins over them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

PRESETS_DIR = Path(__file__).resolve().parents[2] / "presets"


def preset_names() -> list[str]:
    """The presets shipped with the recipe."""
    return sorted(p.stem for p in PRESETS_DIR.glob("*.json"))


def load_preset(name: str, options: set[str]) -> dict[str, Any]:
    """The option values of preset ``name``; every key must be one of ``options`` (option destinations)."""
    path = PRESETS_DIR / f"{name}.json"
    if not path.is_file():
        raise ValueError(f"no preset {name!r}: choose one of {', '.join(preset_names())}")
    values = {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_")}
    unknown = sorted(set(values) - options)
    if unknown:
        raise ValueError(f"preset {path} sets {unknown}, which are no options of the recipe: fix the file")
    return values

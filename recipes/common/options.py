"""The command-line vocabulary both recipes share: one spelling per option (accelerate's and transformers' names).

Both recipes spell these options the same way: ``--max_steps``, ``--gradient_accumulation_steps``,
``--checkpointing_steps``, ``--checkpoints_total_limit``, ``--resume_from_checkpoint``, ``--mixed_precision``,
``--seed`` / ``--seeds``, ``--output_dir`` and ``--report_to`` (:data:`SHARED_OPTIONS`). The spellings they used
before (:data:`DEPRECATED_SPELLINGS`) keep working until the next minor release: :func:`add_deprecated_spellings`
makes each one a hidden alias of its new option that warns once, naming the new spelling.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

SHARED_OPTIONS = (
    "--max_steps",
    "--gradient_accumulation_steps",
    "--checkpointing_steps",
    "--checkpoints_total_limit",
    "--resume_from_checkpoint",
    "--mixed_precision",
    "--seed",
    "--seeds",
    "--output_dir",
    "--report_to",
)
# old spelling -> the shared one; both recipes accept every old spelling whose new option they have
DEPRECATED_SPELLINGS = {
    "--steps": "--max_steps",  # DG
    "--grad_accum": "--gradient_accumulation_steps",  # AVSR
    "--save_every": "--checkpointing_steps",  # AVSR
    "--resume": "--resume_from_checkpoint",  # AVSR
    "--trial_seeds": "--seeds",  # DG
}
REMOVED_IN = "0.3.0"  # the next minor release
MIXED_PRECISION_CHOICES = ("no", "fp16", "bf16")  # accelerate's
REPORT_TO_CHOICES = ("none", "tensorboard")  # the trackers the recipes are tested with (accelerate's names)


def mixed_precision(requested: str | None) -> str:
    """The precision a run's ``Accelerator`` gets: ``--mixed_precision``, else the launcher's
    (``ACCELERATE_MIXED_PRECISION``, which ``accelerate launch`` sets), else ``"no"``.

    The recipes always pass it explicitly. accelerate keeps one state per process, and an ``Accelerator()`` made
    without ``mixed_precision`` silently takes an earlier one's (a TRL ``SFTTrainer`` made before in the same process
    leaves bf16 where the CPU supports it); given a value, accelerate refuses the mismatch instead.
    """
    return requested or os.environ.get("ACCELERATE_MIXED_PRECISION", "no").lower()


def _outside_argparse() -> int:
    """The ``stacklevel`` of the first caller outside argparse and this module: the code that parsed the line."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_globals.get("__name__") in ("argparse", __name__):
        frame, level = frame.f_back, level + 1
    return level


class _DeprecatedSpelling(argparse.Action):
    """An old option string: warns that it is deprecated, then does what the new option's action does."""

    def __init__(self, option_strings, dest, target: argparse.Action, **kwargs):
        super().__init__(option_strings, dest, **kwargs)
        self.target = target

    def __call__(self, parser, namespace, values, option_string=None):
        new = self.target.option_strings[-1]
        warnings.warn(
            f"{option_string} is deprecated and will be removed in peft-gnnmoe {REMOVED_IN}: use {new}",
            FutureWarning,
            stacklevel=_outside_argparse(),
        )
        self.target(parser, namespace, values, new)


def add_deprecated_spellings(parser: argparse.ArgumentParser, spellings: dict[str, str] | None = None) -> list[str]:
    """Accept every old spelling whose new option ``parser`` has, as a hidden alias that warns; returns them.

    The alias parses exactly like the new option (same destination, type, ``nargs``, choices and constant), so
    ``--grad_accum 4`` and ``--gradient_accumulation_steps 4`` give the same namespace. Call it after the new options
    are added.
    """
    added = []
    for old, new in (DEPRECATED_SPELLINGS if spellings is None else spellings).items():
        target = parser._option_string_actions.get(new)
        if target is None or old in parser._option_string_actions:
            continue
        parser.add_argument(
            old,
            action=_DeprecatedSpelling,
            target=target,
            dest=target.dest,
            nargs=target.nargs,
            const=target.const,
            type=target.type,
            choices=target.choices,
            default=argparse.SUPPRESS,
            help=argparse.SUPPRESS,
            metavar=target.metavar,
        )
        added.append(old)
    return added

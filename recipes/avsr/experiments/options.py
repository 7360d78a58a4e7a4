"""The experiments' own option groups, and how an experiment's command line is resolved."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..pipeline.config.cli import Entry, parse_args, resolve_args
from ..pipeline.config.fields import group_values, option
from ..pipeline.config.run import RunConfig

DECOR_SWEEP_WEIGHTS = (0.0, 0.1, 1.0, 10.0, 100.0)  # lambdas tried (0 = the baseline)
SINK_DEFAULTS = {"modalities": ("asr",), "projector": "avg"}  # one modality, the sink paper's projector


@dataclass(frozen=True)
class SinkConfig:
    """Sink analysis: the two compression rates compared and the thresholds of attention sinks and massive
    activations."""

    rates: tuple[int, int] | None = option(
        None,
        "low and high rate of the analysed modality (default 2 16 for audio, 1 8 for vsr)",
        flag="--sink_rates",
        type=int,
        nargs=2,
        metavar=("LOW", "HIGH"),
    )
    threshold: float = option(0.3, "attention-sink score threshold (Gu et al.)", flag="--sink_threshold")
    massive_magnitude: float = option(100.0, "massive activation: |h| above this")
    massive_ratio: float = option(1000.0, "massive activation: |h| / median above this")
    weight: float = 0.1  # lambda of the trained-with-the-loss cells: --decor_weight, or 0.1

    def __post_init__(self):
        if self.rates is not None:
            object.__setattr__(self, "rates", tuple(self.rates))


@dataclass(frozen=True)
class SweepConfig:
    """The lambda sweep: the loss weights tried at the high rate of --sink_rates."""

    weights: tuple[float, ...] = option(
        DECOR_SWEEP_WEIGHTS,
        "the lambdas tried; the one of lowest validation loss is chosen",
        flag="--decor_weights",
        type=float,
        nargs="+",
    )

    def __post_init__(self):
        object.__setattr__(self, "weights", tuple(self.weights))
        if any(not math.isfinite(w) or w < 0 for w in self.weights) or len(set(self.weights)) < 2:
            raise ValueError(
                f"--decor_weights needs two or more distinct finite lambdas >= 0, got {list(self.weights)}"
            )


def parse_experiment(argv: list[str] | None, entry: Entry) -> tuple[RunConfig, dict, set[str]]:
    """The run configuration of an experiment's command line, the parsed values and the options it gave."""
    args = parse_args(argv, entry)
    return resolve_args(args, entry), vars(args), set(args.given)


def sink_config(config: RunConfig, values: dict, given: set[str]) -> SinkConfig:
    """The sink analysis of ``config``: rates by the analysed modality unless given, λ = ``--decor_weight`` or 0.1."""
    sinks = SinkConfig(**group_values(SinkConfig, {k: values[k] for k in given}))
    rates = sinks.rates or ((1, 8) if config.modalities[0] == "vsr" else (2, 16))
    return SinkConfig(**{**sinks.__dict__, "rates": rates, "weight": config.model.decor_weight or 0.1})

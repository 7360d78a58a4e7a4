"""The run configuration: the run's own options and the groups, checked against each other once."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ...data.loader import LoaderConfig
from ..alignment import check_ctc_weight
from .data import DataConfig
from .evaluation import EvalConfig
from .fields import option
from .model import ModelConfig
from .train import TrainConfig

MODALITIES = ("asr", "vsr", "avsr")


@dataclass(frozen=True)
class RunConfig:
    """Run: the modalities trained, the output folder, seeds, and decoding a finished run."""

    modalities: tuple[str, ...] = option(
        MODALITIES,
        "one or more modalities, each trained and decoded in turn (the real preset and the experiments: asr)",
        flag="--modality",
        nargs="+",
        choices=MODALITIES,
    )
    output_dir: Path = option(Path("runs/avsr"), "folder of the run's corpus, models and results", type=Path)
    seed: int = option(0, "seed of the corpus, the stand-in models and the training run")
    seeds: tuple[int, ...] | None = option(
        None,
        "train and decode every modality once per seed (output_dir/seed_<S>/...) and report mean +- std; a seed "
        "changes the projector/LoRA/new-token initialisation, dropout and the batch order, while the corpus and the "
        "stand-in models stay those of --seed",
        type=int,
        nargs="+",
    )
    eval_only: bool = option(False, "decode the finished run --resume_from <run>/final")
    resume_from: Path | None = option(None, "--eval_only: a run's final/ folder (adapter + projectors)", type=Path)
    data: DataConfig = field(default_factory=DataConfig)
    loader: LoaderConfig = field(default_factory=LoaderConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    experiment: str = "none"  # set by an experiment's entry point (recipes.avsr.experiments)

    def __post_init__(self):
        object.__setattr__(self, "modalities", tuple(self.modalities))
        object.__setattr__(self, "output_dir", Path(self.output_dir))
        if self.seeds is not None:
            object.__setattr__(self, "seeds", tuple(self.seeds))
        if self.resume_from is not None:
            object.__setattr__(self, "resume_from", Path(self.resume_from))
        self._check()

    def _check(self) -> None:
        """The rules that involve more than one group (each group checks its own fields)."""
        check_ctc_weight(self.model.ctc_weight, self.modalities)
        resume = self.train.resume_from_checkpoint
        several_runs = len(self.modalities) > 1 or self.experiment != "none"
        if resume not in (None, "latest") and several_runs:
            runs = f"the {self.experiment} experiment" if self.experiment != "none" else ", ".join(self.modalities)
            raise ValueError(
                f"--resume_from_checkpoint {resume} names one run's checkpoint, but this invocation trains several "
                f"runs ({runs}): pass one --modality, or --resume_from_checkpoint latest (each run resumes from its "
                "own newest checkpoint)"
            )
        if resume not in (None, "latest") and self.seeds:
            raise ValueError(
                f"--resume_from_checkpoint {resume} is one run's checkpoint; with --seeds pass "
                "--resume_from_checkpoint latest"
            )
        if self.eval_only and not self.resume_from:
            raise ValueError("--eval_only needs --resume_from <run>/final (the folder a finished run saved)")
        if self.eval_only and self.experiment != "none":
            raise ValueError(
                f"--eval_only decodes one finished run; it does not apply to the {self.experiment} experiment"
            )
        if self.seeds and self.eval_only:
            raise ValueError("--seeds repeats training runs; it does not apply to --eval_only")
        if self.seeds and len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"--seeds has repeated values: {list(self.seeds)}")
        if self.loader.augmenting and self.model.cache_features:
            raise ValueError(
                "--train_snr_range / --time_mask change the encoders' inputs every epoch, which --cache_features "
                "would hide: pass --no-cache_features"
            )
        if self.model.cache_features and self.loader.random_crop:
            raise ValueError("--cache_features reuses encoder outputs, which --random_crop would change; pick one")
        if self.loader.test_noise == "babble" and self.loader.test_snr_db is None and not self.eval.test_snrs:
            raise ValueError("--decode_noise babble needs --decode_snr_target <dB> or --test_snrs <dB> ...")

    @property
    def embedded(self) -> bool:
        """Whether the run uses the embedded corpus (no ``--data_dir``)."""
        return self.data.embedded

    @property
    def data_dir(self) -> Path:
        """The corpus folder: ``--data_dir``, or ``<output_dir>/corpus`` for the embedded corpus."""
        return self.output_dir / "corpus" if self.data.embedded else self.data.data_dir

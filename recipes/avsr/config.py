"""The command line of the AVSR recipe and the one immutable run configuration resolved from it.

:func:`resolve_config` turns the parsed arguments into a frozen :class:`RunConfig` once, filling every default that
depends on other choices (embedded corpus or LRS3, the sink experiment); nothing mutates it afterwards, and the rest
of the recipe takes the few values it needs from it.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path

from .data.loader import LoaderConfig
from .data.synthetic import TEXTS
from .options import (
    REAL_AUDIO_ENCODER,
    REAL_AUDIO_WINDOW,
    REAL_EPOCHS,
    REAL_LLM,
    add_control_options,
    add_real_options,
    check_checkpoints_given,
    check_control_options,
    with_tier_defaults,
)
from .stand_ins import stand_in_paths

# LoRA settings: ours, and Llama-AVSR's (its README's commands: --reduction_lora 64 --alpha 8, no dropout)
LORA_PRESETS = {
    "default": {"lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.05},
    "llama_avsr": {"lora_r": 64, "lora_alpha": 8, "lora_dropout": 0.0},
}
# --experiment decor_sweep: lambdas tried (0 = the baseline), and the held-out training utterances that choose one
DECOR_SWEEP_WEIGHTS = (0.0, 0.1, 1.0, 10.0, 100.0)
DECOR_SWEEP_VAL_UTTS = 64
DESCRIPTION = "LLM-based ASR / VSR / AVSR with LoRA and optional sink decorrelation, in the Llama-AVSR style."


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The recipe's arguments (``python -m recipes.avsr --help`` lists them)."""
    p = argparse.ArgumentParser(
        prog="recipes.avsr", description=DESCRIPTION, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    g = p.add_argument_group("task")
    g.add_argument(
        "--modality",
        nargs="+",
        choices=["asr", "vsr", "avsr"],
        default=None,
        help="one or more modalities, each trained and decoded in turn (default: asr vsr avsr; asr with --real)",
    )
    g.add_argument(
        "--experiment",
        choices=["none", "sinks", "decor_sweep"],
        default="none",
        help="'sinks': train with/without the decorrelation loss at a low and a high rate, then analyse; "
        "'decor_sweep': choose the loss weight lambda on held-out training utterances (--decor_weights)",
    )
    g.add_argument("--output_dir", default="runs/avsr")
    g.add_argument("--seed", type=int, default=0)

    g = p.add_argument_group("data")
    g.add_argument(
        "--data_dir", default=None, help="LRS3 root (auto_avsr or raw layout); default: the embedded corpus"
    )
    g.add_argument("--layout", choices=["auto", "auto_avsr", "raw"], default="auto")
    g.add_argument(
        "--train_csv", default=None, help="auto_avsr labels CSV for training (default: the one named *train*)"
    )
    g.add_argument("--test_csv", default=None, help="auto_avsr labels CSV for testing (default: the one named *test*)")
    g.add_argument("--raw_train_subsets", nargs="+", default=["trainval"], help="raw LRS3 folders used for training")
    g.add_argument(
        "--crop_size",
        type=int,
        default=None,
        help="centre crop of the mouth frames (default 88 for LRS3, 44 for the embedded corpus)",
    )
    g.add_argument(
        "--mouth_box",
        type=int,
        nargs=4,
        default=None,
        metavar=("TOP", "LEFT", "H", "W"),
        help="fixed mouth region cut from raw LRS3 face videos before cropping",
    )
    g.add_argument(
        "--max_frames",
        type=int,
        default=None,
        help="frame budget of a training batch (video frames at 25 fps; default: Llama-AVSR's 1000 for asr/avsr, "
        "1500 for vsr on LRS3; none for the embedded corpus)",
    )
    g.add_argument("--max_batch_size", type=int, default=16)
    g.add_argument("--max_test_utts", type=int, default=None, help="decode only the first N test utterances")
    g.add_argument(
        "--preload",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="decode every file once into memory (default: on for the embedded corpus)",
    )
    g.add_argument("--num_workers", type=int, default=0)
    g.add_argument(
        "--random_crop",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="random crop of the training frames (default: on for LRS3, off for the embedded corpus)",
    )
    g.add_argument(
        "--cache_features",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="keep each utterance's frozen-encoder output in memory (default: on for the embedded corpus)",
    )
    g.add_argument("--corpus_train", type=int, default=1200, help="embedded corpus: training utterances")
    g.add_argument("--corpus_test", type=int, default=120, help="embedded corpus: test utterances")
    g.add_argument(
        "--corpus_text",
        choices=TEXTS,
        default=None,
        help="embedded corpus: 'grid', six-word commands over 34 words, or 'open', natural English sentences of 4-12 "
        "words from Debian's fortunes package (thousands of words; needs a pretrained LLM's subword tokenizer). "
        "Default: grid",
    )
    g.add_argument(
        "--corpus_vocab",
        type=int,
        default=None,
        metavar="N",
        help="embedded corpus, --corpus_text open only: keep the sentences made of the N most frequent words "
        "(1200: 1,363 sentences, 3%% of test words unseen in training, against 21%% with every word). Default: "
        "every word",
    )
    g.add_argument(
        "--held_out_speakers",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="embedded corpus: the test split is spoken by two voices training never hears (default: off, on with "
        "--real)",
    )

    g = p.add_argument_group("model")
    g.add_argument("--llm", default=None, help="causal LM id or path (default: an embedded small Llama)")
    g.add_argument("--audio_encoder", default=None, help="Whisper id or path (default: an embedded small Whisper)")
    g.add_argument(
        "--video_encoder",
        default=None,
        help="saved LipEncoderModel dir or transformers image model (default: an embedded LipEncoder)",
    )
    g.add_argument("--audio_rate", type=int, default=4, help="audio frames (50 Hz) per LLM token")
    g.add_argument("--video_rate", type=int, default=2, help="video frames (25 fps) per LLM token")
    g.add_argument(
        "--projector",
        choices=["stack", "avg"],
        default=None,
        help="compress by stacking K frames or average-pooling them (default: stack; avg for --experiment sinks and "
        "decor_sweep, as in the sink paper)",
    )
    g.add_argument(
        "--projector_hidden", type=int, default=None, help="projector MLP width (default 2048; 512 embedded)"
    )
    g.add_argument(
        "--llm_dtype",
        choices=["fp32", "bf16", "fp16"],
        default=None,
        help="dtype of the frozen LLM's weights (bf16 as Llama-AVSR trains; the projectors and LoRA stay fp32; "
        "default fp32, bf16 with --real)",
    )
    g.add_argument(
        "--audio_encoder_dtype",
        choices=["fp32", "bf16"],
        default=None,
        help="dtype of the frozen audio encoder's weights (its output goes to the projector in fp32); default fp32, "
        "bf16 with --real (Whisper tiny.en: 1.8x faster on this CPU, frames within cosine 0.9997 of fp32)",
    )
    g.add_argument("--projector_layer_norm", action="store_true")
    g.add_argument(
        "--ctc_weight",
        type=float,
        default=0.0,
        help="weight of an auxiliary CTC loss that scores each projected audio token against the LLM's embedding "
        "matrix and asks the tokens to spell the transcript (recipes/avsr/alignment.py): it pulls the projector's "
        "output towards the embeddings of the spoken tokens. Training only; 0 = off",
    )
    g.add_argument(
        "--lora_preset",
        choices=sorted(LORA_PRESETS),
        default="default",
        help="LoRA rank/alpha/dropout: 'default' 8/16/0.05, 'llama_avsr' the reference's 64/8/0 (scale 1/8); "
        "--lora_r/--lora_alpha/--lora_dropout override single values",
    )
    g.add_argument("--lora_r", type=int, default=None)
    g.add_argument("--lora_alpha", type=int, default=None)
    g.add_argument("--lora_dropout", type=float, default=None)
    g.add_argument("--lora_targets", nargs="+", default=["q_proj", "v_proj"])

    g = p.add_argument_group("sink decorrelation")
    g.add_argument("--decor_weight", type=float, default=0.0, help="lambda of the decorrelation loss (0 = off)")
    g.add_argument("--decor_tokens", choices=["all", "prefix"], default="prefix")
    g.add_argument("--decor_layers", default="all_but_last", help="'all', 'all_but_last' or comma-separated indices")
    g.add_argument("--decor_form", choices=["squared", "abs"], default="squared")
    g.add_argument(
        "--sink_rates",
        type=int,
        nargs=2,
        default=None,
        metavar=("LOW", "HIGH"),
        help="--experiment sinks: low and high rate of the analysed modality (default 2 16 audio, 1 8 video)",
    )
    g.add_argument(
        "--decor_weights",
        type=float,
        nargs="+",
        default=None,
        help=f"--experiment decor_sweep: the lambdas tried at the high --sink_rates rate (default "
        f"{' '.join(f'{w:g}' for w in DECOR_SWEEP_WEIGHTS)}); the one of lowest validation loss is chosen",
    )
    g.add_argument("--sink_threshold", type=float, default=0.3, help="attention-sink score threshold (Gu et al.)")
    g.add_argument("--massive_magnitude", type=float, default=100.0, help="massive activation: |h| above this")
    g.add_argument("--massive_ratio", type=float, default=1000.0, help="massive activation: |h| / median above this")

    g = p.add_argument_group("training and decoding")
    g.add_argument(
        "--epochs", type=float, default=None, help="training epochs (default 12 embedded, 4 with --real, 10 otherwise)"
    )
    g.add_argument("--max_steps", type=int, default=None, help="overrides --epochs")
    g.add_argument("--lr", type=float, default=None, help="default 1e-3 (asr, avsr) / 5e-4 (vsr), as Llama-AVSR")
    g.add_argument("--weight_decay", type=float, default=0.1)
    g.add_argument("--warmup_steps", type=int, default=None, help="default: 5%% of the steps")
    g.add_argument("--grad_accum", type=int, default=1)
    g.add_argument(
        "--mixed_precision", choices=["no", "fp16", "bf16"], default=None, help="default: accelerate's config"
    )
    g.add_argument("--save_every", type=int, default=0, help="checkpoint every N optimizer steps (0: none)")
    g.add_argument("--checkpoints_total_limit", type=int, default=None, help="newest checkpoints kept (default all)")
    g.add_argument("--resume", default=None, help="checkpoint dir to resume from, or 'latest'")
    g.add_argument("--eval_only", action="store_true", help="decode the finished run --resume_from <run>/final")
    g.add_argument("--resume_from", default=None, help="--eval_only: a run's final/ folder (adapter + projectors)")
    g.add_argument("--decode_snr_target", type=float, default=None, help="noise at this SNR (dB) on the test audio")
    g.add_argument(
        "--num_beams", type=int, default=None, help="beam width (default 15 as Llama-AVSR; 1, greedy, with --real)"
    )
    g.add_argument("--max_new_tokens", type=int, default=32)
    g.add_argument("--eval_batch_size", type=int, default=16)
    g.add_argument(
        "--eval_untrained",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also decode with the untrained model (the WER that training must beat)",
    )
    g.add_argument("--encoder_pretrain_steps", type=int, default=800, help="embedded encoders: CTC steps")
    g.add_argument("--text_pretrain_steps", type=int, default=300, help="embedded LLM: language-model steps")
    add_control_options(p)
    add_real_options(p)
    args = p.parse_args(argv)
    if args.modality is None:  # an experiment analyses one modality: asr unless one is named
        args.modality = ["asr"] if args.real or args.experiment != "none" else ["asr", "vsr", "avsr"]
    elif args.experiment != "none" and len(args.modality) > 1:
        p.error(
            f"--experiment {args.experiment} analyses one modality, got --modality {' '.join(args.modality)}: "
            "run it once per modality"
        )
    return args


@dataclass(frozen=True)
class ModelConfig:
    """What :func:`recipes.avsr.loop.build_model` builds: checkpoints, projectors, LoRA and sink decorrelation."""

    llm: str
    audio_encoder: str | None
    video_encoder: str | None
    audio_rate: int = 4
    video_rate: int = 2
    projector: str = "stack"
    projector_hidden: int = 2048
    projector_layer_norm: bool = False
    ctc_weight: float = 0.0  # auxiliary CTC loss aligning the audio tokens with the LLM's embeddings (0: off)
    llm_dtype: str = "fp32"
    audio_encoder_dtype: str = "fp32"
    audio_window: int | None = None  # seconds of Whisper input (None: the checkpoint's own, 30 s)
    cache_features: bool = False
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_targets: tuple[str, ...] = ("q_proj", "v_proj")
    decor_weight: float = 0.0
    decor_tokens: str = "prefix"
    decor_layers: str | tuple[int, ...] = "all_but_last"
    decor_form: str = "squared"


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation and checkpointing of one training run (:func:`recipes.avsr.loop.train`)."""

    epochs: float = 10
    max_steps: int | None = None
    lr: float | None = None
    weight_decay: float = 0.1
    warmup_steps: int | None = None
    save_every: int = 0
    checkpoints_total_limit: int | None = None
    resume: str | None = None
    val_utts: int = 0
    average_last: int = 0

    def learning_rate(self, modality: str) -> float:
        """``lr``, or Llama-AVSR's default: 5e-4 for VSR, 1e-3 for ASR and AVSR."""
        return self.lr or (5e-4 if modality == "vsr" else 1e-3)


@dataclass(frozen=True)
class SinkConfig:
    """The miniature sink experiment (:mod:`recipes.avsr.sinks`)."""

    rates: tuple[int, int] = (2, 16)
    weight: float = 0.1
    sweep_weights: tuple[float, ...] = ()  # --experiment decor_sweep: the lambdas tried
    threshold: float = 0.3
    massive_magnitude: float = 100.0
    massive_ratio: float = 1000.0


@dataclass(frozen=True)
class RunConfig:
    """Everything a run needs, resolved once from the command line (:func:`resolve_config`)."""

    modalities: tuple[str, ...]
    experiment: str
    output_dir: Path
    seed: int
    embedded: bool
    data_dir: Path
    layout: str
    train_csv: str | None
    test_csv: str | None
    raw_train_subsets: tuple[str, ...]
    max_test_utts: int | None
    corpus_train: int
    corpus_test: int
    corpus_text: str  # the embedded corpus's sentences: "grid" or "open"
    corpus_vocab: int | None  # "open": only sentences of the N most frequent words (None: every word)
    held_out_speakers: bool  # the embedded test split in voices training never hears
    loader: LoaderConfig
    model: ModelConfig
    train: TrainConfig
    sinks: SinkConfig
    grad_accum: int
    mixed_precision: str | None
    num_beams: int
    max_new_tokens: int
    eval_untrained: bool
    eval_only: bool
    resume_from: Path | None
    encoder_pretrain_steps: int
    text_pretrain_steps: int
    seeds: tuple[int, ...] | None = None  # --seeds: one run per seed; corpus and stand-ins of ``seed``
    swap_controls: bool = False
    swap_seed: int = 0
    test_snrs: tuple[float, ...] = ()  # the test set decoded again with loader.test_noise at each SNR (dB)
    real_speech_test: bool = False  # also decode pocketsphinx-testdata's recorded utterances (asr)


def check_sweep_options(args: argparse.Namespace) -> None:
    """``--decor_weights`` belongs to ``--experiment decor_sweep``, which needs two or more distinct lambdas >= 0 and
    sets the loss weight of each run itself (so a single ``--decor_weight`` would be ignored: refused)."""
    if args.experiment == "decor_sweep" and args.decor_weight:
        raise ValueError(
            "--experiment decor_sweep trains one run per --decor_weights lambda; --decor_weight would be ignored: "
            "drop it, or list it in --decor_weights"
        )
    if args.decor_weights is None:
        return
    if args.experiment != "decor_sweep":
        raise ValueError(
            "--decor_weights lists the lambdas of --experiment decor_sweep; add that, or use --decor_weight"
        )
    if any(not math.isfinite(w) or w < 0 for w in args.decor_weights) or len(set(args.decor_weights)) < 2:
        raise ValueError(f"--decor_weights needs two or more distinct finite lambdas >= 0, got {args.decor_weights}")


def resolve_config(args: argparse.Namespace) -> RunConfig:
    """The frozen run configuration of parsed arguments (``args`` is left as it is).

    Without ``--data_dir`` the run uses the embedded corpus (``output_dir/corpus``) and stand-in models
    (``output_dir/base_models``, see :mod:`recipes.avsr.stand_ins`), with defaults sized for them.
    """
    shaping = (args.corpus_text, args.corpus_vocab, args.held_out_speakers)
    if args.data_dir is not None and any(v is not None for v in shaping):
        raise ValueError(
            "--corpus_text, --corpus_vocab and --held_out_speakers shape the embedded corpus; with --data_dir, drop "
            "them"
        )
    args = with_tier_defaults(args)
    if args.corpus_vocab is not None and (args.corpus_text != "open" or args.corpus_vocab < 1):
        raise ValueError(
            f"--corpus_vocab {args.corpus_vocab} bounds the words of --corpus_text open: pass --corpus_text open "
            "and a vocabulary of at least 1 word"
        )
    embedded = args.data_dir is None
    if not embedded:
        check_checkpoints_given(args)
    several_runs = len(args.modality) > 1 or args.experiment != "none"
    if args.resume not in (None, "latest") and several_runs:
        raise ValueError(
            f"--resume {args.resume} names one run's checkpoint, but this invocation trains several runs "
            f"({f'--experiment {args.experiment}' if args.experiment != 'none' else ', '.join(args.modality)}): "
            "pass one --modality, or --resume latest (each run resumes from its own newest checkpoint)"
        )
    if args.eval_only and not args.resume_from:
        raise ValueError("--eval_only needs --resume_from <run>/final (the folder a finished run saved)")
    if args.eval_only and args.experiment != "none":
        raise ValueError(f"--eval_only decodes one finished run; it does not apply to --experiment {args.experiment}")
    check_sweep_options(args)
    if not (math.isfinite(args.ctc_weight) and args.ctc_weight >= 0):
        raise ValueError(f"--ctc_weight must be a finite number >= 0 (0 turns it off), got {args.ctc_weight}")
    if args.ctc_weight and "vsr" in args.modality:
        raise ValueError(
            "--ctc_weight aligns the audio tokens, and --modality vsr has none: drop vsr, or train it in a separate "
            "run without --ctc_weight"
        )
    output_dir = Path(args.output_dir)
    random_crop = not embedded if args.random_crop is None else args.random_crop
    augmenting = bool(args.train_snr_range) or args.time_mask
    cache_features = (embedded and not augmenting) if args.cache_features is None else args.cache_features
    check_control_options(args, cache_features)
    if cache_features and random_crop:
        raise ValueError("--cache_features reuses encoder outputs, which --random_crop would change; pick one")
    stand_ins = stand_in_paths(output_dir)
    decor_layers = (
        args.decor_layers
        if args.decor_layers in ("all", "all_but_last")
        else tuple(int(i) for i in args.decor_layers.split(","))
    )
    llm = args.llm or (REAL_LLM if args.real else None)
    if embedded and args.corpus_text == "open" and llm is None:
        raise ValueError(
            "--corpus_text open has thousands of words, and many test words never occur in training; the embedded "
            "stand-in LLM's word-level tokenizer knows the training words only: pass --real or --llm <pretrained LLM>"
        )
    audio_encoder = args.audio_encoder or (REAL_AUDIO_ENCODER if args.real else None)
    model = ModelConfig(
        llm=llm or (str(stand_ins["llm"]) if embedded else None),
        audio_encoder=audio_encoder or (str(stand_ins["audio_encoder"]) if embedded else None),
        video_encoder=args.video_encoder or (str(stand_ins["video_encoder"]) if embedded else None),
        audio_rate=args.audio_rate,
        video_rate=args.video_rate,
        projector=args.projector or ("stack" if args.experiment == "none" else "avg"),
        projector_hidden=args.projector_hidden or (512 if embedded and not args.real else 2048),
        projector_layer_norm=args.projector_layer_norm,
        ctc_weight=args.ctc_weight,
        llm_dtype=args.llm_dtype or ("bf16" if args.real else "fp32"),
        audio_encoder_dtype=args.audio_encoder_dtype or ("bf16" if args.real else "fp32"),
        audio_window=args.audio_window or (REAL_AUDIO_WINDOW if args.real else None),
        cache_features=cache_features,
        **{k: v if getattr(args, k) is None else getattr(args, k) for k, v in LORA_PRESETS[args.lora_preset].items()},
        lora_targets=tuple(args.lora_targets),
        decor_weight=args.decor_weight,
        decor_tokens=args.decor_tokens,
        decor_layers=decor_layers,
        decor_form=args.decor_form,
    )
    loader = LoaderConfig(
        crop_size=args.crop_size or (44 if embedded else 88),  # 48 px synthetic frames; LRS3 crops 96 -> 88
        mouth_box=tuple(args.mouth_box) if args.mouth_box else None,
        random_crop=random_crop,
        preload=embedded if args.preload is None else args.preload,
        max_frames=args.max_frames,
        reference_budget=not embedded,
        max_batch_size=args.max_batch_size,
        eval_batch_size=args.eval_batch_size,
        num_workers=args.num_workers,
        test_snr_db=args.decode_snr_target,
        test_noise=args.decode_noise,
        train_snr_range=args.train_snr_range,
        time_mask=args.time_mask,
    )
    train = TrainConfig(
        epochs=args.epochs or (REAL_EPOCHS if args.real else 12 if embedded else 10),
        max_steps=args.max_steps,
        lr=args.lr,
        weight_decay=args.weight_decay,
        warmup_steps=args.warmup_steps,
        save_every=args.save_every,
        checkpoints_total_limit=args.checkpoints_total_limit,
        resume=args.resume,
        val_utts=args.val_utts or (DECOR_SWEEP_VAL_UTTS if args.experiment == "decor_sweep" else 0),
        average_last=args.average_last,
    )
    sinks = SinkConfig(
        rates=tuple(args.sink_rates) if args.sink_rates else ((1, 8) if args.modality[0] == "vsr" else (2, 16)),
        weight=args.decor_weight or 0.1,
        sweep_weights=tuple(args.decor_weights or DECOR_SWEEP_WEIGHTS),
        threshold=args.sink_threshold,
        massive_magnitude=args.massive_magnitude,
        massive_ratio=args.massive_ratio,
    )
    return RunConfig(
        modalities=tuple(args.modality),
        experiment=args.experiment,
        output_dir=output_dir,
        seed=args.seed,
        embedded=embedded,
        data_dir=output_dir / "corpus" if embedded else Path(args.data_dir),
        layout=args.layout,
        train_csv=args.train_csv,
        test_csv=args.test_csv,
        raw_train_subsets=tuple(args.raw_train_subsets),
        max_test_utts=args.max_test_utts,
        corpus_train=args.corpus_train,
        corpus_test=args.corpus_test,
        corpus_text=args.corpus_text,
        corpus_vocab=args.corpus_vocab,
        held_out_speakers=args.held_out_speakers,
        loader=loader,
        model=model,
        train=train,
        sinks=sinks,
        grad_accum=args.grad_accum,
        mixed_precision=args.mixed_precision,
        num_beams=args.num_beams or (1 if args.real else 15),
        max_new_tokens=args.max_new_tokens,
        eval_untrained=args.eval_untrained,
        eval_only=args.eval_only,
        resume_from=Path(args.resume_from) if args.resume_from else None,
        encoder_pretrain_steps=args.encoder_pretrain_steps,
        text_pretrain_steps=args.text_pretrain_steps,
        seeds=tuple(args.seeds) if args.seeds else None,
        swap_controls=args.swap_controls,
        swap_seed=args.swap_seed,
        test_snrs=args.test_snrs,
        real_speech_test=args.real if args.real_speech_test is None else args.real_speech_test,
    )

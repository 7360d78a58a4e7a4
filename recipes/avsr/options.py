"""The recipe's options for controls, seeds, noise, augmentation, validation and checkpoint averaging, and the
real-weights tier (``--real``).

All are off by default: without them a run is the same as before they existed (same batches, same WERs). ``--real``
turns on babble noise in training and a WER-against-SNR sweep at test (:func:`with_tier_defaults`).
"""

from __future__ import annotations

import argparse
import math

from .data.augment import NOISE_TYPES

REAL_TRAIN_SNR_RANGE = (-5.0, 20.0)  # --real: Llama-AVSR's babble augmentation in training
REAL_TEST_SNRS = (10.0, 5.0, 0.0, -5.0)  # --real: the test set decoded again with babble at these SNRs


def _db(value: float) -> str:
    return f"{value:g}"


def add_control_options(p: argparse.ArgumentParser) -> None:
    """Add the option group to the recipe's parser (:func:`recipes.avsr.config.parse_args`)."""
    g = p.add_argument_group("controls, seeds, noise and augmentation (off by default; --real adds noise)")
    g.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=None,
        help="train and decode every modality (or every cell of --experiment sinks) once per seed "
        "(output_dir/seed_<S>/...) and report mean +- std; a seed changes the projector/LoRA/new-token "
        "initialisation, dropout and the batch order, while the corpus and the stand-in models stay those of --seed",
    )
    g.add_argument(
        "--swap_controls",
        action="store_true",
        help="also decode with the video (wer_swap_video) and/or audio (wer_swap_audio) of every test utterance "
        "replaced by another's (a fixed derangement): shows whether each stream is used",
    )
    g.add_argument("--swap_seed", type=int, default=0, help="seed of the swap controls' derangement")
    g.add_argument(
        "--decode_noise",
        choices=NOISE_TYPES,
        default=None,
        help="the noise of --decode_snr_target and --test_snrs: white, or babble (4 training utterances summed); "
        "default white, babble with --real",
    )
    g.add_argument(
        "--test_snrs",
        type=float,
        nargs="*",
        default=None,
        metavar="DB",
        help="after the clean test set, decode it again with --decode_noise at each of these SNRs (dB): the WER "
        f"against SNR (results.json 'test_by_snr'); default none, {' '.join(map(_db, REAL_TEST_SNRS))} with --real "
        "(an empty list turns it off)",
    )
    g.add_argument(
        "--train_snr_range",
        nargs="+",
        default=None,
        metavar="LOW HIGH | off",
        help="babble noise on the training audio at an SNR (dB) drawn per utterance and epoch (Llama-AVSR: -5 20); "
        f"default off, {' '.join(map(_db, REAL_TRAIN_SNR_RANGE))} with --real ('off' turns it off)",
    )
    g.add_argument(
        "--time_mask",
        action="store_true",
        help="Llama-AVSR's time masking in training: up to 0.4 s of audio per second, up to 10 of every 25 frames",
    )
    g.add_argument(
        "--val_utts",
        type=int,
        default=0,
        help="hold out the last N training utterances and log their loss after every epoch (train_log.json)",
    )
    g.add_argument(
        "--average_last",
        type=int,
        default=0,
        help="at the end of training, average the weights of the last N checkpoints (--save_every) into final/",
    )


REAL_LLM, REAL_AUDIO_ENCODER = "smollm2", "whisper-tiny.en"  # presets of recipes.common.pretrained, converted offline
REAL_AUDIO_WINDOW = 8  # seconds: the longest embedded or recorded test utterance is 7.1 s
REAL_EPOCHS = 4  # 300 steps of 16 utterances on the embedded corpus: the tier's 30-minute budget on 2 CPU cores


def add_real_options(p: argparse.ArgumentParser) -> None:
    """The real-weights tier: pretrained parts that install offline instead of the embedded stand-ins."""
    g = p.add_argument_group("real pretrained parts")
    g.add_argument(
        "--real",
        action="store_true",
        help=f"use Whisper tiny.en ({REAL_AUDIO_ENCODER!r}) and SmolLM2-135M-Instruct ({REAL_LLM!r}), converted on "
        "first use from the wheels scripts/setup.sh installs, instead of the stand-ins (--audio_encoder / --llm still "
        "override); ASR unless --modality says otherwise. Video keeps the in-repo lip encoder: no pretrained lip "
        "reader installs offline",
    )
    g.add_argument(
        "--audio_window",
        type=int,
        default=None,
        help="seconds of audio the Whisper encoder sees, its positional table cut to match (whisper.cpp's "
        f"audio_ctx); default: the checkpoint's 30 s, {REAL_AUDIO_WINDOW:g} s with --real. Longer audio is skipped "
        "and counted",
    )
    g.add_argument(
        "--real_speech_test",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also decode the 10 recorded utterances of Debian's pocketsphinx-testdata (asr only; default: on "
        "with --real)",
    )


def _snr_range(values: list[str] | None) -> tuple[float, float] | None:
    if values is None or values == ["off"]:
        return None
    try:
        low, high = (float(v) for v in values)
    except ValueError:
        raise ValueError(f"--train_snr_range takes LOW HIGH (dB) or 'off', got {' '.join(values)}") from None
    return low, high


def with_tier_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """A copy of ``args`` with the noise and corpus choices left open filled in: those of ``--real`` (babble noise
    in training and at test, held-out test voices), or the plain defaults (all off); the grammar corpus for both."""
    real = args.real
    test_snrs = tuple(REAL_TEST_SNRS if real and args.test_snrs is None else args.test_snrs or ())
    noisy_test = bool(test_snrs) or args.decode_snr_target is not None
    train_snr_range = REAL_TRAIN_SNR_RANGE if real and args.train_snr_range is None else None
    values = {
        "corpus_text": args.corpus_text or "grid",  # open: does not train in --real's budget (README)
        "held_out_speakers": real if args.held_out_speakers is None else args.held_out_speakers,
        "train_snr_range": train_snr_range or _snr_range(args.train_snr_range),
        "test_snrs": test_snrs,
        "decode_noise": args.decode_noise or ("babble" if real and noisy_test else "white"),
    }
    return argparse.Namespace(**{**vars(args), **values})


def check_control_options(args: argparse.Namespace, cache_features: bool) -> None:
    """Raise early on combinations that cannot work (``cache_features``: the resolved choice)."""
    if (args.train_snr_range or args.time_mask) and cache_features:
        raise ValueError(
            "--train_snr_range / --time_mask change the encoders' inputs every epoch, which --cache_features would "
            "hide: pass --no-cache_features"
        )
    if args.train_snr_range and args.train_snr_range[0] > args.train_snr_range[1]:
        raise ValueError(f"--train_snr_range LOW HIGH needs LOW <= HIGH, got {args.train_snr_range}")
    if args.decode_noise == "babble" and args.decode_snr_target is None and not args.test_snrs:
        raise ValueError("--decode_noise babble needs --decode_snr_target <dB> or --test_snrs <dB> ...")
    if any(not math.isfinite(v) for v in (*args.test_snrs, *(args.train_snr_range or ()))):
        raise ValueError("SNRs must be finite numbers of dB (--test_snrs, --train_snr_range)")
    if args.average_last and not args.save_every:
        raise ValueError("--average_last N averages saved checkpoints: pass --save_every as well")
    if args.average_last and args.checkpoints_total_limit and args.checkpoints_total_limit < args.average_last:
        raise ValueError(
            f"--average_last {args.average_last} needs at least that many checkpoints kept "
            f"(--checkpoints_total_limit {args.checkpoints_total_limit})"
        )
    if args.average_last < 0 or args.val_utts < 0:
        raise ValueError("--average_last and --val_utts take a count >= 0")
    if args.seeds and args.eval_only:
        raise ValueError("--seeds repeats training runs; it does not apply to --eval_only")
    if args.seeds and args.resume not in (None, "latest"):
        raise ValueError(f"--resume {args.resume} is one run's checkpoint; with --seeds pass --resume latest")
    if args.real_speech_test and "asr" not in args.modality:
        raise ValueError("--real_speech_test decodes recorded speech without video: it needs --modality asr")
    if args.seeds and len(set(args.seeds)) != len(args.seeds):
        raise ValueError(f"--seeds has repeated values: {args.seeds}")


def models_used(modalities) -> list[str]:
    """The checkpoints runs of ``modalities`` load: the LLM, and the audio and / or video encoder."""
    used = ["llm"]
    if {"asr", "avsr"} & set(modalities):
        used.append("audio_encoder")
    if {"vsr", "avsr"} & set(modalities):
        used.append("video_encoder")
    return used


def check_checkpoints_given(args: argparse.Namespace) -> None:
    """With ``--data_dir`` there are no embedded models: the checkpoints must be named."""
    from_real = {"llm", "audio_encoder"} if args.real else set()  # --real names these two
    missing = [f"--{m}" for m in models_used(args.modality) if not (getattr(args, m) or m in from_real)]
    if missing:
        raise SystemExit(
            f"with --data_dir, pass {', '.join(missing)} (the embedded models exist only for the "
            "embedded corpus; e.g. --llm meta-llama/Llama-3.2-1B --audio_encoder openai/whisper-medium)"
        )

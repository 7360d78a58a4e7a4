"""The training entry point's command line: core --help, presets as data, flags over presets, the old spellings."""

import warnings

import pytest

from recipes.avsr.pipeline.config.cli import build_parser, parse_config
from recipes.avsr.pipeline.config.fields import count_help_options

# today's resolve_config (commit 8c50205) gave these values; the refactor keeps them
BEFORE = {
    (): {"modalities": ("asr", "vsr", "avsr"), "loader.crop_size": 44, "model.projector_hidden": 512,
         "train.epochs": 12, "eval.num_beams": 15, "model.cache_features": True, "loader.random_crop": False},
    ("--real",): {"modalities": ("asr",), "model.llm": "smollm2", "model.audio_window": 8, "train.epochs": 4,
                  "eval.num_beams": 1, "loader.test_noise": "babble", "loader.train_snr_range": (-5.0, 20.0),
                  "eval.test_snrs": (10.0, 5.0, 0.0, -5.0), "data.real_speech_test": True,
                  "model.cache_features": False, "model.projector_hidden": 2048},
    ("--data_dir", "/d", "--llm", "l", "--audio_encoder", "a", "--video_encoder", "v"): {
        "loader.crop_size": 88, "loader.random_crop": True, "loader.preload": False, "train.epochs": 10,
        "model.projector_hidden": 2048, "model.cache_features": False, "loader.reference_budget": True},
    ("--preset", "llama_avsr"): {"model.lora_r": 64, "model.lora_alpha": 8, "model.lora_dropout": 0.0},
    ("--real", "--test_snrs"): {"loader.test_noise": "white", "eval.test_snrs": ()},
}  # fmt: skip


def _get(config, path):
    for part in path.split("."):
        config = getattr(config, part)
    return config


@pytest.mark.parametrize("argv", list(BEFORE), ids=[" ".join(a) or "default" for a in BEFORE])
def test_resolved_values_are_those_of_before_the_redesign(argv):
    config = parse_config(list(argv))
    for path, value in BEFORE[argv].items():
        assert _get(config, path) == value, path


def test_help_lists_at_most_45_options():
    assert count_help_options(build_parser().format_help()) <= 45
    assert count_help_options(build_parser(show_all=True).format_help()) > 45  # --help_all: every option


@pytest.mark.parametrize(
    ("argv", "path", "value"),
    [
        (["--real", "--epochs", "12"], "train.epochs", 12.0),  # the preset's 4 differs from the default 10
        (["--real", "--num_beams", "15"], "eval.num_beams", 15),  # the parser default, given explicitly
        (["--real", "--llm", "my/llm"], "model.llm", "my/llm"),
        (["--preset", "llama_avsr", "--lora_r", "16"], "model.lora_r", 16),
        (["--real", "--train_snr_range", "off"], "loader.train_snr_range", None),
        (["--crop_size", "48"], "loader.crop_size", 48),  # over the embedded preset's 44
    ],
)
def test_a_flag_always_wins_over_a_preset(argv, path, value):
    assert _get(parse_config(argv), path) == value


@pytest.mark.parametrize(
    ("old", "new"),
    [
        (["--grad_accum", "4"], ["--gradient_accumulation_steps", "4"]),
        (["--save_every", "5"], ["--checkpointing_steps", "5"]),
        (["--resume", "latest"], ["--resume_from_checkpoint", "latest"]),
        (["--lora_preset", "llama_avsr"], ["--preset", "llama_avsr"]),
    ],
)
def test_an_old_spelling_parses_to_the_same_config_and_warns(old, new):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        expected = parse_config(new)
    with pytest.warns(FutureWarning, match=f"{old[0]} is deprecated .* use {new[0]}"):
        assert parse_config(old) == expected


def test_the_old_experiment_flag_names_the_new_command(capsys):
    with pytest.raises(SystemExit):
        parse_config(["--experiment", "sinks"])
    assert "python -m recipes.avsr.experiments.sinks" in capsys.readouterr().err


def test_print_shows_the_resolved_configuration(capsys):
    with pytest.raises(SystemExit):
        parse_config(["--preset", "real", "--print"])
    assert '"llm": "smollm2"' in capsys.readouterr().out


def test_report_to_is_an_option():
    assert parse_config(["--report_to", "tensorboard"]).train.report_to == "tensorboard"
    assert parse_config([]).train.report_to == "none"

"""AVSR recipe configuration: resolved once from the arguments, frozen, defaults that depend on the run."""

import dataclasses
from pathlib import Path

import pytest

from recipes.avsr.experiments import decor_sweep, sinks
from recipes.avsr.experiments.options import parse_experiment, sink_config
from recipes.avsr.pipeline.config.cli import parse_args, parse_config, resolve_args

ENTRIES = {"sinks": sinks.ENTRY, "decor_sweep": decor_sweep.ENTRY}


def test_resolving_leaves_the_arguments_alone_and_the_config_is_frozen():
    args = parse_args(["--output_dir", "runs/x"])
    before = dict(vars(args))
    config = resolve_args(args)
    assert vars(args) == before
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.seed = 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.model.decor_weight = 1.0


def test_embedded_defaults():
    config = parse_config(["--output_dir", "runs/x"])
    assert config.embedded
    assert config.data_dir == Path("runs/x/corpus")
    assert config.model.llm == str(Path("runs/x/base_models/llm"))
    assert config.model.video_encoder == str(Path("runs/x/base_models/video_encoder"))
    assert config.model.projector == "stack"
    assert config.model.projector_hidden == 512
    assert config.model.cache_features
    assert config.loader.crop_size == 44
    assert config.loader.preload
    assert not config.loader.random_crop
    assert config.train.epochs == 12
    assert config.train.learning_rate("vsr") == 5e-4
    assert config.train.learning_rate("avsr") == 1e-3


def test_lrs3_defaults_and_the_sink_experiment():
    argv = ["--data_dir", "/data/lrs3", "--llm", "l", "--audio_encoder", "a", "--video_encoder", "v"]
    config, values, given = parse_experiment(argv + ["--modality", "vsr", "--decor_layers", "0,2"], sinks.ENTRY)
    analysis = sink_config(config, values, given)
    assert not config.embedded
    assert config.data_dir == Path("/data/lrs3")
    assert config.model.llm == "l"
    assert config.model.projector == "avg"  # the sink paper's projector
    assert config.model.projector_hidden == 2048
    assert config.model.decor_layers == (0, 2)
    assert not config.model.cache_features
    assert config.loader.crop_size == 88
    assert config.loader.random_crop
    assert config.train.epochs == 10
    assert analysis.rates == (1, 8)  # video rates for vsr
    assert analysis.weight == 0.1


def test_errors_are_raised_before_anything_runs():
    with pytest.raises(SystemExit, match="--audio_encoder"):
        parse_config(["--data_dir", "/data/lrs3", "--llm", "l", "--modality", "asr"])
    with pytest.raises(ValueError, match="--random_crop"):
        parse_config(["--cache_features", "--random_crop"])


def test_llm_dtype_and_the_reference_frame_budget():
    embedded = parse_config(["--output_dir", "runs/x"])
    assert embedded.model.llm_dtype == "fp32"  # the default on CPU
    assert embedded.loader.frame_budget("asr") is None  # the embedded corpus: max_batch_size only
    argv = ["--data_dir", "/data/lrs3", "--llm", "l", "--audio_encoder", "a", "--video_encoder", "v"]
    lrs3 = parse_config(argv + ["--llm_dtype", "bf16"])
    assert lrs3.model.llm_dtype == "bf16"
    assert lrs3.loader.frame_budget("asr") == 1000  # Llama-AVSR's budgets
    assert lrs3.loader.frame_budget("vsr") == 1500
    assert lrs3.loader.frame_budget("avsr") == 1000
    assert parse_config(argv + ["--max_frames", "700"]).loader.frame_budget("vsr") == 700


def test_an_explicit_checkpoint_is_refused_for_several_runs():
    with pytest.raises(ValueError, match="--resume_from_checkpoint latest"):
        parse_config(["--resume_from_checkpoint", "runs/x/asr/checkpoints/step_2"])  # asr, vsr and avsr
    with pytest.raises(ValueError, match="one --modality"):
        parse_experiment(["--resume_from_checkpoint", "step_2", "--modality", "asr"], sinks.ENTRY)
    one = parse_config(["--resume_from_checkpoint", "runs/x/asr/checkpoints/step_2", "--modality", "asr"])
    assert one.train.resume_from_checkpoint == "runs/x/asr/checkpoints/step_2"
    assert parse_config(["--resume_from_checkpoint", "latest"]).train.resume_from_checkpoint == "latest"


def test_eval_only_needs_a_finished_run():
    with pytest.raises(ValueError, match="--resume_from"):
        parse_config(["--eval_only"])
    config = parse_config(["--eval_only", "--resume_from", "runs/x/asr/final"])
    assert config.eval_only
    assert config.resume_from == Path("runs/x/asr/final")


def test_the_llama_avsr_lora_preset():
    assert parse_config([]).model.lora_r == 8  # ours: 8 / 16 / 0.05
    config = parse_config(["--preset", "llama_avsr"])
    assert config.model.lora_r == 64
    assert config.model.lora_alpha == 8
    assert config.model.lora_dropout == 0.0
    assert parse_config(["--preset", "llama_avsr", "--lora_r", "16"]).model.lora_r == 16


@pytest.mark.parametrize("experiment", ["sinks", "decor_sweep"])
def test_an_experiment_analyses_one_modality(experiment, capsys):
    assert parse_experiment([], ENTRIES[experiment])[0].modalities == ("asr",)
    assert parse_experiment(["--modality", "vsr"], ENTRIES[experiment])[0].modalities == ("vsr",)
    with pytest.raises(SystemExit):
        parse_args(["--modality", "asr", "vsr"], ENTRIES[experiment])
    assert f"the {experiment} experiment analyses one modality, got --modality asr vsr" in capsys.readouterr().err

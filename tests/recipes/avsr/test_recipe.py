"""AVSR recipe end to end on a tiny embedded corpus: results files, resume, bad files, the sink experiment."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from recipes.avsr.data.lrs3 import read_manifest
from recipes.avsr.experiments.decor_sweep import main as decor_sweep
from recipes.avsr.experiments.sinks import main as sinks
from recipes.avsr.pipeline.main import main
from recipes.avsr.reports import sink_summary

ROOT = Path(__file__).resolve().parents[3]  # the checkout: `python -m recipes.avsr` runs from there


@pytest.mark.slow
def test_help_runs_as_a_module():
    out = subprocess.run([sys.executable, "-m", "recipes.avsr", "--help"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0
    assert "--decor_weight" in out.stdout
    assert "--modality" in out.stdout


@pytest.mark.slow
def test_end_to_end_avsr_writes_results_and_weights(tmp_path, small):
    out = tmp_path / "run"  # empty: the run builds its corpus and stand-ins (the other runs here copy them)
    results = main(small("--output_dir", str(out), "--modality", "avsr", "--max_steps", "3"))
    res = json.loads((out / "avsr" / "results.json").read_text())
    assert res == json.loads(json.dumps(results["avsr"]))
    assert 0 <= res["test"]["wer"]
    assert res["test"]["n"] == 4
    assert "wer" in res["untrained"]
    assert res["training"]["steps"] == 3
    assert res["skipped_files"]["count"] == 0
    assert "| avsr |" in (out / "results.md").read_text()
    rows = [json.loads(line) for line in (out / "avsr" / "decodes.jsonl").read_text().splitlines()]
    assert len(rows) == 4
    assert all(set(r) == {"uid", "ref", "hyp"} for r in rows)
    history = json.loads((out / "avsr" / "train_log.json").read_text())
    assert [h["step"] for h in history] == [1, 2, 3]
    assert all(h["loss"] > 0 for h in history)
    adapter = out / "avsr" / "final" / "adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["peft_type"] == "LORA"
    saved = load_file(adapter / "adapter_model.safetensors")
    assert any("lora_A" in k for k in saved)
    llm_config = json.loads((out / "base_models" / "llm" / "config.json").read_text())
    full = (llm_config["vocab_size"], llm_config["hidden_size"])
    assert all(tuple(t.shape) != full for t in saved.values())  # no embed_tokens / lm_head of the frozen LLM
    assert all(t.shape[0] != llm_config["vocab_size"] for t in saved.values())
    projectors = load_file(out / "avsr" / "final" / "projectors.safetensors")
    assert {k.split(".")[0] for k in projectors} == {"audio_proj", "video_proj"}
    assert len(read_manifest(out / "manifest_test.jsonl")) == 4
    # the embedded base models were saved as transformers checkpoints and are reused by the next run
    assert all((out / "base_models" / n / "config.json").is_file() for n in ("llm", "audio_encoder", "video_encoder"))


@pytest.mark.slow
def test_noisy_test_sets_are_encoded_afresh_when_the_feature_cache_is_on(tmp_path, monkeypatch, small, prepare_run):
    """The embedded corpus caches encoder outputs by uid (clean training); the --test_snrs decodes hold the same
    uids with noise added, so they must not be served the cached clean features."""
    from recipes.avsr.pipeline import run, scoring
    from recipes.avsr.pipeline.model import AVSRModel

    encoded, decoding = [], []
    original_encode, original_decode = AVSRModel._encode_audio, scoring.decode

    def counting_encode(self, features):
        encoded.append((decoding[-1] if decoding else "train", features.shape[0]))
        return original_encode(self, features)

    def tagged_decode(accelerator, model, loader, desc, **kwargs):
        decoding.append(desc)
        return original_decode(accelerator, model, loader, desc, **kwargs)

    monkeypatch.setattr(AVSRModel, "_encode_audio", counting_encode)
    monkeypatch.setattr(scoring, "decode", tagged_decode)
    monkeypatch.setattr(run, "decode", tagged_decode)
    out = prepare_run(tmp_path / "run")
    results = main(small("--output_dir", str(out), "--modality", "asr", "--max_steps", "1", "--no-eval_untrained",
                         "--test_snrs", "0", "--decode_noise", "babble"))["asr"]  # fmt: skip
    assert "0" in results["test_by_snr"]["snr_db"]
    rows = {desc: sum(n for d, n in encoded if d == desc) for desc in decoding}
    assert rows["decode asr"] == 4 and rows["decode asr at 0 dB"] == 4  # every noisy test utterance encoded


def _final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    weights = load_file(run_dir / "final" / "projectors.safetensors")
    weights.update(load_file(run_dir / "final" / "adapter" / "adapter_model.safetensors"))
    return weights


@pytest.mark.slow
def test_resume_continues_exactly(tmp_path, small, prepare_run):
    out = prepare_run(tmp_path / "run")
    common = small("--output_dir", str(out), "--modality", "asr", "--max_steps", "6",
                   "--gradient_accumulation_steps", "2", "--checkpointing_steps", "2", "--no-eval_untrained",
                   "--lora_dropout", "0.1")  # fmt: skip
    main(common)
    straight = _final_weights(out / "asr")
    log = json.loads((out / "asr" / "train_log.json").read_text())
    assert (out / "asr" / "checkpoints" / "step_4" / "trainer_state.json").is_file()
    assert not list((out / "asr" / "checkpoints" / "step_4").glob("model*.safetensors"))  # no frozen weights saved

    main(
        common
        + ["--resume_from_checkpoint", str(out / "asr" / "checkpoints" / "step_2"), "--checkpoints_total_limit", "1"]
    )
    resumed = _final_weights(out / "asr")
    assert [p.name for p in (out / "asr" / "checkpoints").iterdir()] == ["step_6"]  # the limit; no partial folder
    assert straight.keys() == resumed.keys()
    for key in straight:
        assert torch.allclose(straight[key], resumed[key], atol=1e-6), key
    resumed_log = json.loads((out / "asr" / "train_log.json").read_text())
    assert [h["step"] for h in resumed_log] == [1, 2, 3, 4, 5, 6]
    assert all(abs(a["loss"] - b["loss"]) < 1e-4 for a, b in zip(log, resumed_log))  # same losses after the resume

    main(
        common + ["--resume_from_checkpoint", "latest"]
    )  # step_6: nothing left to train, the same final weights again
    latest = _final_weights(out / "asr")
    for key in straight:
        assert torch.equal(latest[key], resumed[key]), key
    assert [h["step"] for h in json.loads((out / "asr" / "train_log.json").read_text())] == [1, 2, 3, 4, 5, 6]


def _count_accelerators(monkeypatch) -> list:
    """Record every ``Accelerator`` created (the real constructor still runs)."""
    import accelerate

    created = []
    init = accelerate.Accelerator.__init__

    def counting_init(self, *args, **kwargs):
        created.append(self)
        init(self, *args, **kwargs)

    monkeypatch.setattr(accelerate.Accelerator, "__init__", counting_init)
    return created


@pytest.mark.slow
def test_a_corrupt_training_file_is_reported_and_skipped(tmp_path, small, prepare_run):
    out = prepare_run(tmp_path / "run", parts=("corpus",))  # the stand-ins are pretrained on the corrupt corpus
    bad = sorted((out / "corpus" / "synth" / "synth_video" / "trainval").rglob("*.mp4"))[5]
    bad.write_bytes(b"\x00" * 100)
    results = main(small("--output_dir", str(out), "--modality", "vsr", "--max_steps", "2", "--no-eval_untrained"))
    skipped = results["vsr"]["skipped_files"]
    assert skipped["count"] == 1
    assert str(bad) in next(iter(skipped["examples"].values()))


@pytest.mark.slow
def test_sink_experiment_writes_table_and_plots(tmp_path, monkeypatch, small, prepare_run):
    out = prepare_run(tmp_path / "run")
    accelerators = _count_accelerators(monkeypatch)
    sinks(small("--output_dir", str(out), "--modality", "asr", "--sink_rates", "2", "4",
                "--decor_weight", "0.5", "--max_steps", "2", "--no-eval_untrained",
                "--seeds", "0", "1"))  # fmt: skip
    assert len(accelerators) == 1  # eight runs, one Accelerator per process
    rows = json.loads((out / "sinks" / "sinks.json").read_text())
    cells = [(None, "before"), (0.0, "trained"), (0.5, "trained")]
    expected = [(s, rate, w, stage) for s in (0, 1) for rate in (2, 4) for w, stage in cells]
    assert [(r["seed"], r["rate"], r["decor_weight"], r["stage"]) for r in rows] == expected
    n_layers = len(rows[0]["bos_cosine_per_layer"])
    for r in rows:
        assert -1 <= r["mean_bos_cosine"] <= 1
        assert r["intermediate_sinks_per_utt"] >= 0
        assert len(r["intermediate_sinks_per_layer"]) == len(r["top_activation_per_layer"]) == n_layers
        assert r["top_activation"] == max(r["top_activation_per_layer"]) > 0
        assert ("wer" in r) == (r["stage"] == "trained")
    before = [r for r in rows if r["stage"] == "before" and r["rate"] == 2]
    assert before[0]["mean_bos_cosine"] != before[1]["mean_bos_cosine"]  # each seed's own initial projectors
    summary = json.loads((out / "sinks" / "summary.json").read_text())
    cells_summary = summary["cells"]
    assert [(e["rate"], e["decor_weight"]) for e in cells_summary] == [(2, None), (2, 0.0), (2, 0.5), (4, None),
                                                                       (4, 0.0), (4, 0.5)]  # fmt: skip
    plain = [r["wer"] for r in rows if (r["rate"], r["decor_weight"]) == (2, 0.0)]
    assert cells_summary[1]["wer"]["n"] == 2 and abs(cells_summary[1]["wer"]["mean"] - sum(plain) / 2) < 1e-9
    with_loss = [r["wer"] for r in rows if (r["rate"], r["decor_weight"]) == (2, 0.5)]
    paired_wer = next(p for p in summary["paired"] if (p["rate"], p["field"]) == (2, "wer"))
    assert paired_wer["seeds"] == [0, 1] and paired_wer["diffs"] == [a - b for a, b in zip(with_loss, plain)]
    low, high = paired_wer["interval"]
    assert low <= paired_wer["mean"] <= high
    assert {(p["rate"], p["field"]) for p in summary["paired"]} >= {(4, "wer"), (4, "massive_activations")}
    table, paired_md = (out / "sinks" / "sinks.md").read_text().split("With the loss minus without")
    assert table.count("\n| ") == 7  # header + six cells
    assert "| 2 | before fine-tuning | – |" in table and " ± " in table
    assert paired_md.count("\n| 2 | 0.5 | ") == paired_md.count("\n| 4 | 0.5 | ") == len(sink_summary.PAIRED)
    plots = {p.name for p in (out / "sinks" / "plots").glob("*.png")}
    assert "summary.png" in plots
    seed_plots = {p.name for p in (out / "sinks" / "seed_1" / "plots").glob("*.png")}
    assert {"asr_rate4_decor0.5_attention_sinks.png", "asr_rate4_before_bos_cosine.png"} <= seed_plots
    assert {"asr_rate2_decor0_attention_map.png", "asr_rate2_before_sink_vs_other_cosine.png"} <= seed_plots
    for r in rows:  # every layer has tokens that are not sinks; a sink group exists only at layers with sinks
        assert all(v is not None for v in r["bos_cosine_of_others_per_layer"])
        assert [v is not None for v in r["bos_cosine_of_sinks_per_layer"]] == [
            n > 0 for n in r["intermediate_sinks_per_layer"]
        ]
    decor_log = json.loads((out / "sinks" / "seed_0" / "asr_rate2_decor0.5" / "train_log.json").read_text())
    assert all("decor" in h for h in decor_log)  # the wrapped model reported both loss parts
    assert all("ce" in h for h in decor_log)
    plain_log = json.loads((out / "sinks" / "seed_0" / "asr_rate2_decor0" / "train_log.json").read_text())
    assert all("decor" not in h for h in plain_log)


def _llm_without_delimiters(path: Path) -> tuple[int, int]:
    """A small untied Llama whose tokenizer lacks the modality delimiters (as a pretrained LLM's does): the recipe
    adds them and grows the embedding and LM head. Returns the (vocab, hidden) shape of those."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from recipes.avsr.data.synthetic import GRAMMAR
    from recipes.avsr.pipeline.sequences import PROMPTS

    words = {w for ws in GRAMMAR.values() for w in ws} | {w for p in PROMPTS.values() for w in p.lower().split()}
    vocab = {t: i for i, t in enumerate(["<pad>", "<s>", "</s>", "<unk>", *sorted(words)])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return len(vocab), 32


@pytest.mark.slow
def test_a_saved_run_holds_no_full_embedding_and_eval_only_reproduces_its_wer(tmp_path, small, prepare_run):
    out = prepare_run(tmp_path / "run")
    vocab, hidden = _llm_without_delimiters(tmp_path / "llm")
    common = small(
        "--output_dir", str(out), "--modality", "asr", "--no-eval_untrained", "--llm", str(tmp_path / "llm")
    )
    trained = main(common + ["--max_steps", "3"])["asr"]
    final = out / "asr" / "final"
    adapter = load_file(final / "adapter" / "adapter_model.safetensors")
    assert any("lora_A" in k for k in adapter)
    assert all(t.shape[0] < vocab for t in adapter.values())  # no embedding / LM head of the LLM's (grown) size
    added = load_file(final / "added_tokens.safetensors")
    assert set(added) == {"embed_tokens", "lm_head"}  # untied: both get the rows of the 4 delimiters
    assert added["embed_tokens"].shape == (4, hidden)
    assert added["lm_head"].shape == (4, hidden)
    assert json.loads((final / "run.json").read_text())["modality"] == "asr"

    evaluated = main(common + ["--eval_only", "--resume_from", str(final)])["asr"]
    assert evaluated["test"] == trained["test"]  # WER, CER and the number of utterances, exactly
    rows = [json.loads(line) for line in (out / "asr" / "decodes.jsonl").read_text().splitlines()]
    again = [json.loads(line) for line in (out / "eval" / "decodes.jsonl").read_text().splitlines()]
    assert again == rows  # the same hypotheses, utterance by utterance
    assert "training" not in evaluated


@pytest.mark.distributed
def test_two_processes_give_the_metrics_of_one(tmp_path, small, prepare_run):
    """DDP over 2 CPU processes (gloo) against 1 process with 2 accumulation steps: the same batches per optimizer
    step (6 batches of 4 per epoch, 3 epochs), so the same steps and test metrics; the run must also end (it hung
    after the first epoch: each process has 3 batches per epoch, the resume arithmetic counted 6)."""
    common = small("--modality", "asr", "--epochs", "3", "--lora_dropout", "0", "--no-eval_untrained")
    one_dir, two_dir = prepare_run(tmp_path / "one"), prepare_run(tmp_path / "two")
    one = main(common + ["--output_dir", str(one_dir), "--gradient_accumulation_steps", "2"])["asr"]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "-m", "recipes.avsr", *common, "--output_dir", str(two_dir)]  # fmt: skip
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    # a session of its own: on a timeout (the old hang) the launcher and both workers are killed, none left behind
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # fmt: skip
    try:
        _, stderr = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    assert proc.returncode == 0, stderr[-4000:]
    two = json.loads((two_dir / "asr" / "results.json").read_text())
    assert one["training"]["steps"] == 9
    assert two["training"]["steps"] == 9
    assert two["test"] == one["test"]
    assert len(json.loads((two_dir / "asr" / "train_log.json").read_text())) == 9


@pytest.mark.slow
def test_decor_sweep_chooses_the_lambda_of_lowest_validation_loss(tmp_path, small, prepare_run):
    out = prepare_run(tmp_path / "run")
    summary = decor_sweep(small("--output_dir", str(out), "--modality", "asr",
                                "--sink_rates", "2", "4", "--decor_weights", "0", "0.5", "50", "--max_steps", "2",
                                "--val_utts", "4", "--no-eval_untrained"))  # fmt: skip
    saved = json.loads((out / "decor_sweep" / "sweep.json").read_text())
    assert saved == json.loads(json.dumps(summary))
    assert [c["decor_weight"] for c in saved["cells"]] == [0.0, 0.5, 50.0]
    assert {r["rate"] for r in saved["rows"]} == {4}  # the high rate
    assert all(isinstance(r["massive_tokens_by_segment"], dict) for r in saved["rows"])
    losses = {r["decor_weight"]: r["val_loss"] for r in saved["rows"]}
    assert saved["chosen"] == min(losses, key=losses.get)
    assert len(set(losses.values())) == 3  # each lambda trained its own model
    for weight in (0.0, 0.5, 50.0):
        log = json.loads(
            (out / "decor_sweep" / "seed_0" / f"asr_rate4_decor{weight:g}" / "train_log.json").read_text()
        )
        assert [h["val_loss"] for h in log if "val_loss" in h][-1] == losses[weight]
        assert all(("decor" in h) == (weight > 0) for h in log if "loss" in h)
    table = (out / "decor_sweep" / "sweep.md").read_text()
    assert table.count("\n| ") == 4 and f"**{saved['chosen']:g}**" in table
    assert (out / "decor_sweep" / "sweep.png").stat().st_size > 0


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--decor_weights", "0", "-1"], "distinct finite lambdas"),
        (["--decor_weights", "1", "1"], "distinct finite lambdas"),
        (["--decor_weight", "0.5"], "would be ignored"),
    ],
)
def test_bad_decor_sweep_options_are_refused(tmp_path, extra, message, small):
    with pytest.raises(ValueError, match=message):
        decor_sweep(small("--output_dir", str(tmp_path), "--modality", "asr", *extra))


def test_the_sweep_options_belong_to_the_sweep(tmp_path, capsys, small):
    with pytest.raises(SystemExit):
        main(small("--output_dir", str(tmp_path), "--modality", "asr", "--decor_weights", "0", "1"))
    assert "--decor_weights" in capsys.readouterr().err


def test_decor_sweep_chooses_on_the_mean_over_seeds():
    from recipes.avsr.reports.sweep_summary import summarise_sweep

    def row(seed, weight, val):
        stats = dict(wer=10.0, mean_bos_cosine=0.5, top_activation=1.0, massive_activations=0, layers_with_sinks=0)
        return {"seed": seed, "rate": 16, "decor_weight": weight, "val_loss": val, **stats}

    # seed 0 alone would choose 1.0; the mean over both seeds chooses 0.1
    rows = [row(0, 0.1, 0.30), row(0, 1.0, 0.20), row(1, 0.1, 0.10), row(1, 1.0, 0.40)]
    summary = summarise_sweep(rows)
    assert summary["chosen"] == 0.1
    cell = summary["cells"][0]
    assert cell["seeds"] == [0, 1] and cell["val_loss"]["n"] == 2
    assert abs(cell["val_loss"]["mean"] - 0.2) < 1e-12 and abs(cell["val_loss"]["std"] - 0.1414213562) < 1e-9
    assert summarise_sweep([row(0, 0.0, 0.2), row(0, 1.0, 0.2)])["chosen"] == 0.0  # a tie: the smaller lambda

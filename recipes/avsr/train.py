"""Entry point of the AVSR recipe: build the data and (embedded) models, then train and decode every modality.

    accelerate launch -m recipes.avsr                       # embedded default: offline corpus, asr + vsr + avsr
    accelerate launch -m recipes.avsr --experiment sinks    # the sink paper's experiment in miniature
    accelerate launch -m recipes.avsr --experiment decor_sweep --modality asr   # choose lambda on validation
    accelerate launch -m recipes.avsr --seeds 0 1 2 --swap_controls   # mean +- std over seeds, with swap controls
    accelerate launch -m recipes.avsr --modality avsr --data_dir /data/lrs3 --llm meta-llama/Llama-3.2-1B \\
        --audio_encoder openai/whisper-medium --video_encoder path/to/lip_encoder --audio_rate 4 --video_rate 2 \\
        --decor_weight 0.1 --output_dir runs/avsr

Without ``--data_dir`` the recipe synthesises a small GRID-like corpus (espeak-ng speech + phoneme-timed mouth
video, written in the auto_avsr LRS3 layout), builds small stand-ins for the pretrained checkpoints (Whisper and lip
encoders trained with word-level CTC, a Llama trained as a language model, all on the training split only), then
trains projectors + LoRA and decodes every modality. Each run writes ``results.json`` / ``results.md`` (with the chance
level of the test set: :mod:`recipes.avsr.controls`), the decoded transcripts, and the adapter + projector weights
(safetensors).
"""

from __future__ import annotations

import dataclasses
import json

from .config import RunConfig, parse_args, resolve_config
from .controls import seed_summary, write_seed_report
from .data.lrs3 import Utterance, check_mouth_crop, detect_layout, load_splits, read_manifest
from .data.real_speech import write_real_speech_manifest
from .data.synthetic import SyntheticCorpusConfig, build_synthetic_corpus
from .decor_sweep import run_decor_sweep
from .loop import Log, evaluate_final, make_accelerator, results_table, run
from .options import models_used
from .sinks import refuse_dropping_other_seeds, run_sink_experiment
from .stand_ins import build_stand_ins, stand_in_paths


def main(argv: list[str] | None = None) -> dict:
    """Run the recipe; returns ``{modality: results}`` (empty for ``--experiment sinks``; the sweep's summary for
    ``--experiment decor_sweep``)."""
    config = resolve_config(parse_args(argv))
    accelerator = make_accelerator(config.grad_accum, config.mixed_precision)
    results = _run_recipe(config, accelerator)
    accelerator.wait_for_everyone()  # every rank done, then the process group torn down, not left to interpreter exit
    accelerator.end_training()
    return results


def _run_recipe(config: RunConfig, accelerator) -> dict:
    out = config.output_dir
    out.mkdir(parents=True, exist_ok=True)

    def log(msg: str) -> None:
        if accelerator.is_main_process:
            print(msg, flush=True)

    if config.experiment == "sinks":
        refuse_dropping_other_seeds(config)
    splits = prepare_data(config, accelerator, log)
    if config.experiment == "sinks":
        run_sink_experiment(config, accelerator, splits, log)
        return {}
    if config.experiment == "decor_sweep":
        return run_decor_sweep(config, accelerator, splits, log) or {}
    if config.eval_only:
        results = [evaluate_final(config, accelerator, splits, out / "eval", log)]
    elif config.seeds:
        return run_seeds(config, accelerator, splits, log)
    else:
        results = [run(config, accelerator, splits, m, out / m, log)[0] for m in config.modalities]
    table = results_table(results)
    (out / "results.md").write_text(table)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    log("\n" + table)
    return {r["modality"]: r for r in results}


def run_seeds(config: RunConfig, accelerator, splits: dict[str, list[Utterance]], log: Log) -> dict:
    """``--seeds``: every modality once per seed in ``output_dir/seed_<S>/<modality>``, on the same corpus and
    stand-ins (those of ``--seed``); writes the seed report (:func:`~recipes.avsr.controls.write_seed_report`: mean ±
    std, avsr against each single stream) and logs it. Returns ``{modality: summary}``."""
    runs = []
    for seed in config.seeds:
        seeded = dataclasses.replace(config, seed=seed)
        for m in config.modalities:
            result = run(seeded, accelerator, splits, m, config.output_dir / f"seed_{seed}" / m, log)[0]
            runs.append({"seed": seed, **result})
    if accelerator.is_main_process:
        log("\n" + write_seed_report(config.output_dir, config.seeds, config.seed, runs))
    return seed_summary(runs)


def corpus_config(config: RunConfig) -> SyntheticCorpusConfig:
    """The embedded corpus a run builds (in ``config.data_dir``)."""
    return SyntheticCorpusConfig(
        n_train=config.corpus_train,
        n_test=config.corpus_test,
        seed=config.seed,
        text=config.corpus_text,
        vocab_size=config.corpus_vocab,
        held_out_speakers=config.held_out_speakers,
    )


def prepare_data(config: RunConfig, accelerator, log: Log) -> dict[str, list[Utterance]]:
    """The train/test splits; for the embedded default, first the corpus and then the stand-in models (built by the
    main process, reused when already in ``output_dir``)."""
    if config.embedded:
        if accelerator.is_main_process:
            log(f"building the embedded corpus in {config.data_dir} (espeak-ng speech + phoneme-timed mouth video)")
            build_synthetic_corpus(config.data_dir, corpus_config(config))
        accelerator.wait_for_everyone()
    if not config.embedded:
        layout = detect_layout(config.data_dir) if config.layout == "auto" else config.layout
        check_mouth_crop(layout, config.loader.mouth_box, uses_video={"vsr", "avsr"} & set(config.modalities))
    splits = load_splits(
        config.data_dir,
        config.output_dir,
        config.layout,
        config.train_csv,
        config.test_csv,
        config.raw_train_subsets,
        config.max_test_utts,
        log,
    )
    if config.real_speech_test:  # written as a manifest and read back, like any LRS3 split
        manifest = config.output_dir / "real_speech.jsonl"
        if accelerator.is_main_process:
            write_real_speech_manifest(manifest)
        accelerator.wait_for_everyone()
        splits["real_speech"] = read_manifest(manifest)
        log(f"real-speech test set: {len(splits['real_speech'])} recorded utterances (pocketsphinx-testdata)")
    if config.embedded and uses_stand_ins(config):
        if accelerator.is_main_process:
            build_stand_ins(  # on clean inputs: the stand-ins do not depend on the run's augmentation
                config.output_dir,
                splits["train"],
                dataclasses.replace(config.loader, train_snr_range=None, time_mask=False),
                config.encoder_pretrain_steps,
                config.text_pretrain_steps,
                config.seed,
                log,
            )
        accelerator.wait_for_everyone()
    return splits


def uses_stand_ins(config: RunConfig) -> bool:
    """Whether any model the runs load is an embedded stand-in (then all of them are built: they train together)."""
    paths = stand_in_paths(config.output_dir)
    return any(getattr(config.model, m) == str(paths[m]) for m in models_used(config.modalities))

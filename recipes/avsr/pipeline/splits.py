"""The data of a run: the train / test splits, and for the embedded default first the corpus and the stand-ins."""

from __future__ import annotations

import dataclasses

from ..data.lrs3 import Utterance, check_mouth_crop, detect_layout, load_splits, read_manifest
from ..data.real_speech import write_real_speech_manifest
from ..data.synthetic import build_synthetic_corpus
from .config.resolve import models_used
from .config.run import RunConfig
from .stand_ins import build_stand_ins, stand_in_paths
from .training import Log


def prepare_data(config: RunConfig, accelerator, log: Log) -> dict[str, list[Utterance]]:
    """The train/test splits; for the embedded default, first the corpus and then the stand-in models (built by the
    main process, reused when already in ``output_dir``)."""
    data = config.data
    if config.embedded:
        if accelerator.is_main_process:
            log(f"building the embedded corpus in {config.data_dir} (espeak-ng speech + phoneme-timed mouth video)")
            build_synthetic_corpus(config.data_dir, data.corpus(config.seed))
        accelerator.wait_for_everyone()
    else:
        layout = detect_layout(config.data_dir) if data.layout == "auto" else data.layout
        check_mouth_crop(layout, config.loader.mouth_box, uses_video={"vsr", "avsr"} & set(config.modalities))
    splits = load_splits(
        config.data_dir,
        config.output_dir,
        data.layout,
        data.train_csv,
        data.test_csv,
        data.raw_train_subsets,
        data.max_test_utts,
        log,
    )
    if data.real_speech_test:  # written as a manifest and read back, like any LRS3 split
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
                config.train.encoder_pretrain_steps,
                config.train.text_pretrain_steps,
                config.seed,
                log,
            )
        accelerator.wait_for_everyone()
    return splits


def uses_stand_ins(config: RunConfig) -> bool:
    """Whether any model the runs load is an embedded stand-in (then all of them are built: they train together)."""
    paths = stand_in_paths(config.output_dir)
    return any(getattr(config.model, m) == str(paths[m]) for m in models_used(config.modalities))

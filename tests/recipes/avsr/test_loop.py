"""AVSR recipe training loop: epochs of the bucket sampler, unreadable training data, mixed-precision loss parts."""

import math

import pytest
import torch
from peft import LoraConfig, get_peft_model

from recipes.avsr.data.loader import LengthBucketSampler, LoaderConfig, make_loader
from recipes.avsr.data.lrs3 import Utterance
from recipes.avsr.data.synthetic import GRAMMAR
from recipes.avsr.pipeline.config.train import TrainConfig
from recipes.avsr.pipeline.lip_encoder import LipEncoderConfig, LipEncoderModel
from recipes.avsr.pipeline.model import AVSRModel
from recipes.avsr.pipeline.stand_ins import build_word_tokenizer, tiny_audio_encoder, tiny_llm
from recipes.avsr.pipeline.training import make_accelerator, set_epoch, total_steps, train

WORDS = [w for ws in GRAMMAR.values() for w in ws]


def _model(modality: str, decor_weight: float = 0.0) -> AVSRModel:
    torch.manual_seed(0)
    tokenizer = build_word_tokenizer(WORDS)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    if decor_weight:
        from peft_gnnmoe.tuners.sink_decorrelation import SinkDecorrelationConfig

        lora = SinkDecorrelationConfig(base_config=lora, weight=decor_weight, bos="first", task_type="CAUSAL_LM")
    llm = get_peft_model(tiny_llm(tokenizer, hidden_size=32, layers=2, heads=2), lora)
    audio, _ = tiny_audio_encoder(seconds=2, d_model=32, layers=1, heads=2)
    video = LipEncoderModel(LipEncoderConfig(stem_channels=4, channels=[8], hidden_size=24, num_layers=1))
    return AVSRModel(llm, tokenizer, modality, audio, video, projector_hidden=16)


def test_steps_are_counted_epoch_by_epoch_on_the_samplers_batches():
    lengths = [5, 9, 14, 30, 31, 33, 60, 61, 8, 90]
    sampler = LengthBucketSampler(lengths, max_frames=100, max_batch_size=3, bucket_size=4)
    loader = torch.utils.data.DataLoader(list(range(10)), batch_sampler=sampler)
    per_epoch = [set_epoch(loader, e) for e in range(3)]
    reference = LengthBucketSampler(lengths, max_frames=100, max_batch_size=3, bucket_size=4)
    expected = []
    for e in range(3):
        reference.set_epoch(e)
        expected.append(len(list(reference)))
    assert per_epoch == expected
    assert len(set(per_epoch)) > 1  # the bucketing changes the number of batches between epochs
    assert total_steps(loader, 3, 1) == sum(per_epoch)
    half_of_last = math.ceil(0.5 * math.ceil(per_epoch[2] / 2))
    assert total_steps(loader, 2.5, 2) == math.ceil(per_epoch[0] / 2) + math.ceil(per_epoch[1] / 2) + half_of_last


def test_training_on_undecodable_files_stops_with_an_error_naming_them(tmp_path):
    utts = []
    for i in range(4):
        (tmp_path / f"{i}.mp4").write_bytes(b"not a video")
        utts.append(Utterance(f"u{i}", str(tmp_path / f"{i}.mp4"), None, "bin blue", 10))
    model = _model("vsr")
    loader = make_loader(LoaderConfig(crop_size=None, max_batch_size=2), utts, "vsr", None, model.tokenizer, True)
    with pytest.raises(RuntimeError, match="no file of epoch 0 could be read") as err:
        train(TrainConfig(max_steps=2), make_accelerator(), model, loader, tmp_path / "run", "vsr", print)
    assert "4 skipped" in str(err.value)
    assert str(tmp_path / "0.mp4") in str(err.value) or str(tmp_path / "1.mp4") in str(err.value)


@pytest.fixture
def bf16_accelerator():
    """An ``Accelerator(mixed_precision="bf16")`` (accelerate's process-wide state is reset around it)."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    yield make_accelerator(TrainConfig(mixed_precision="bf16"))
    AcceleratorState._reset_state(True)


def test_loss_parts_survive_bf16_mixed_precision(bf16_accelerator):
    from recipes.avsr.data.collate import AVSRCollator

    model = _model("vsr", decor_weight=0.5)
    items = [{"uid": f"u{n}", "text": "bin blue", "video": torch.randn(n, 16, 16).numpy()} for n in (6, 9)]
    batch = AVSRCollator(None, model.tokenizer)(items)
    prepared = bf16_accelerator.prepare(model)
    prepared.train()
    out = prepared(batch)  # accelerate's autocast + conversion of the outputs to fp32
    assert out.decorrelation_loss is not None
    assert out.ce_loss is not None
    assert torch.allclose(out.loss, out.ce_loss + 0.5 * out.decorrelation_loss, rtol=1e-2)


def test_encoder_pretraining_on_undecodable_files_stops_with_an_error(tmp_path):
    from recipes.avsr.pipeline.stand_ins import pretrain_encoders_ctc, tiny_video_encoder

    utts = []
    for i in range(3):
        (tmp_path / f"{i}.mp4").write_bytes(b"not a video")
        (tmp_path / f"{i}.wav").write_bytes(b"not audio")
        utts.append(Utterance(f"u{i}", str(tmp_path / f"{i}.mp4"), str(tmp_path / f"{i}.wav"), "bin blue", 10))
    audio, extractor = tiny_audio_encoder(seconds=2, d_model=32, layers=1, heads=2)
    tokenizer = build_word_tokenizer(WORDS)
    with pytest.raises(RuntimeError, match="3 skipped"):
        pretrain_encoders_ctc(
            audio, tiny_video_encoder(32), extractor, tokenizer, utts, LoaderConfig(crop_size=None), 2
        )

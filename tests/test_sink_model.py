"""SinkDecorrelationModel on tiny random-init causal LMs: loss parts, gradients, padding, weight=0, modes, errors."""

from __future__ import annotations

import pytest
import torch
import transformers as T
from peft import LoraConfig, PeftModelForCausalLM, get_peft_model

from peft_gnnmoe import SinkDecorrelationConfig, SinkDecorrelationModel

VOCAB, BOS, EOS, PAD = 64, 1, 2, 0
_SIZES = dict(vocab_size=VOCAB, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD)
_DECODER = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2
)
ARCHS = {
    "llama": (T.LlamaConfig, _DECODER),
    "qwen2": (T.Qwen2Config, _DECODER),
    "gemma": (T.GemmaConfig, dict(_DECODER, head_dim=8)),
    "gpt2": (T.GPT2Config, dict(n_embd=32, n_layer=3, n_head=4)),
}
TARGETS = {
    "llama": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"],
}


def make_lm(arch: str = "llama", seed: int = 0, **overrides) -> torch.nn.Module:
    """A tiny random-init causal LM (3 layers, width 32) built from a transformers config."""
    config_cls, sizes = ARCHS[arch]
    torch.manual_seed(seed)
    return T.AutoModelForCausalLM.from_config(config_cls(**{**_SIZES, **sizes, **overrides}))


def sink_model(arch: str = "llama", seed: int = 0, **config_kwargs):
    """A tiny LM wrapped with a LoRA + sink-decorrelation config; lora_B is randomised so LoRA is not a no-op."""
    config_kwargs.setdefault("base_config", LoraConfig(r=4, target_modules=TARGETS[arch]))
    model = get_peft_model(make_lm(arch, seed), SinkDecorrelationConfig(**config_kwargs))
    randomise_lora(model, seed)
    return model.train()


def randomise_lora(model: torch.nn.Module, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)


def batch(seed: int = 0, lengths=(7, 5), pad_side: str = "right") -> dict[str, torch.Tensor]:
    """Sequences starting with BOS, padded to the longest; labels are the ids (-100 on padding)."""
    generator = torch.Generator().manual_seed(seed)
    seq_len = max(lengths)
    ids = torch.full((len(lengths), seq_len), PAD)
    mask = torch.zeros_like(ids)
    for row, length in enumerate(lengths):
        tokens = torch.cat([torch.tensor([BOS]), torch.randint(3, VOCAB, (length - 1,), generator=generator)])
        span = slice(0, length) if pad_side == "right" else slice(seq_len - length, seq_len)
        ids[row, span], mask[row, span] = tokens, 1
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def lora_grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if "lora_" in n}


def test_forward_reports_parts_and_total():
    model = sink_model(weight=0.5)
    assert isinstance(model.base_model, SinkDecorrelationModel)
    out = model(**batch())
    assert out.decorrelation_loss.item() > 0
    torch.testing.assert_close(out.loss, out.ce_loss + 0.5 * out.decorrelation_loss)
    parts = model.last_loss_parts
    assert set(parts["per_layer"]) == {0, 1, 2}
    torch.testing.assert_close(parts["decorrelation_loss"], torch.stack(list(parts["per_layer"].values())).mean())


def test_gradients_reach_inner_lora_adapter():
    model = sink_model(weight=1.0)
    data = batch()
    data.pop("labels")  # the decorrelation loss alone
    out = model(**data)
    assert out.loss is None
    out.decorrelation_loss.backward()
    grads = lora_grads(model)
    assert grads and all(g.abs().sum() > 0 for g in grads.values())
    assert all(p.grad is None for n, p in model.named_parameters() if "lora_" not in n)


def test_padding_side_invariance():
    model = sink_model(weight=0.1)
    right = model(**batch(pad_side="right"))
    left = model(**batch(pad_side="left"))
    torch.testing.assert_close(left.decorrelation_loss, right.decorrelation_loss, rtol=1e-4, atol=1e-6)
    # and both equal the token-pooled loss over the two unpadded sequences run one at a time
    sums = counts = 0
    for row in range(2):
        single = {k: v[row : row + 1, : (5 if row else 7)] for k, v in batch().items()}
        single_out = model(**single)
        n = single["input_ids"].shape[1] - 1
        sums, counts = sums + single_out.decorrelation_loss * n, counts + n
    torch.testing.assert_close(right.decorrelation_loss, sums / counts, rtol=1e-4, atol=1e-6)


def test_weight_zero_is_exactly_the_inner_lora():
    sink = sink_model(weight=0.0)
    lora = get_peft_model(make_lm(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"])).train()
    lora.load_state_dict(sink.state_dict())
    data = batch()
    out_sink, out_lora = sink(**data), lora(**data)
    assert torch.equal(out_sink.loss, out_lora.loss)
    assert not hasattr(out_sink, "decorrelation_loss")
    out_sink.loss.backward()
    out_lora.loss.backward()
    grads_sink, grads_lora = lora_grads(sink), lora_grads(lora)
    assert grads_sink.keys() == grads_lora.keys()
    assert all(torch.equal(grads_sink[k], grads_lora[k]) for k in grads_sink)


def test_eval_and_generate_have_no_layer_hooks():
    model = sink_model(weight=0.1)
    layers = model.get_base_model().model.layers
    seen = []
    handle = layers[0].register_forward_pre_hook(lambda m, a: seen.append(len(m._forward_hooks)))
    model(**batch())  # training: the loss hook (one per chosen layer) exists during the forward...
    assert seen == [1]
    assert all(len(layer._forward_hooks) == 0 for layer in layers)  # ...and is gone afterwards
    model.eval()
    seen.clear()
    out = model(**batch())
    assert not hasattr(out, "decorrelation_loss") and seen == [0]
    model.generate(input_ids=batch()["input_ids"][:1, :3], max_new_tokens=2, do_sample=False)
    assert set(seen) == {0}
    handle.remove()


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_gradient_checkpointing_gives_same_loss_and_grads(use_reentrant):
    data = batch()
    plain = sink_model(weight=1.0)
    out_plain = plain(**data)
    out_plain.loss.backward()
    ckpt = sink_model(weight=1.0)
    ckpt.get_base_model().activation_checkpointing_enable({"use_reentrant": use_reentrant})
    ckpt.enable_input_require_grads()
    assert all(layer.gradient_checkpointing for layer in ckpt.get_base_model().model.layers)
    out_ckpt = ckpt(**data)
    torch.testing.assert_close(out_ckpt.decorrelation_loss, out_plain.decorrelation_loss)
    out_ckpt.loss.backward()
    grads_plain, grads_ckpt = lora_grads(plain), lora_grads(ckpt)
    for name, grad in grads_plain.items():
        torch.testing.assert_close(grads_ckpt[name], grad, rtol=1e-4, atol=1e-6)


def test_bf16_autocast():
    model = sink_model(weight=1.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(**batch())
    assert torch.isfinite(out.loss) and out.decorrelation_loss.dtype == torch.float32
    out.loss.backward()
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in lora_grads(model).values())


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma", "gpt2"])
def test_architectures(arch):
    model = sink_model(arch, weight=0.1, layers=[0, -1])
    out = model(**batch())
    assert 0 < out.decorrelation_loss.item() <= 1
    assert sorted(model.last_loss_parts["per_layer"]) == [0, 2]
    out.loss.backward()
    assert all(g.abs().sum() > 0 for g in lora_grads(model).values())


def test_reference_selection_all_but_last_and_prefix_tokens():
    model = sink_model(weight=0.1, layers="all_but_last", tokens="prefix")
    data = batch(lengths=(7, 7))
    data["labels"][:, :4] = -100  # BOS + 3 prompt tokens; the rest is the "transcript"
    prefix = model(**data).decorrelation_loss
    assert sorted(model.last_loss_parts["per_layer"]) == [0, 1]
    assert not torch.allclose(prefix, sink_model(weight=0.1, layers="all_but_last")(**data).decorrelation_loss)
    explicit = dict(data, decorrelation_mask=torch.arange(7).expand(2, 7) < 4)  # the same tokens, given directly
    del explicit["labels"]
    torch.testing.assert_close(model(**explicit).decorrelation_loss, prefix)
    with pytest.raises(ValueError, match="tokens='prefix'.*labels"):
        model(input_ids=data["input_ids"])


def test_causal_lm_task_type_and_inputs_embeds_with_explicit_bos():
    lm = make_lm("qwen2")  # Qwen2 has no bos_token_id
    config = SinkDecorrelationConfig(
        base_config=LoraConfig(r=4, target_modules=["q_proj"]), task_type="CAUSAL_LM", bos_token_id=None
    )
    lm.config.bos_token_id = None
    model = get_peft_model(lm, config).train()
    assert isinstance(model, PeftModelForCausalLM)
    data = batch()
    with pytest.raises(ValueError, match="no bos_token_id"):
        model(**data)
    embeds = model.get_input_embeddings()(data["input_ids"])
    # e.g. two multimodal frames in front of the text: BOS is at position 0 here, told explicitly
    mask, labels = data["attention_mask"], data["labels"]
    out = model(inputs_embeds=embeds, attention_mask=mask, labels=labels, bos_positions=0)
    assert out.decorrelation_loss.item() > 0
    out_shifted = model(inputs_embeds=embeds, attention_mask=mask, bos_positions=torch.tensor([1, 2]))
    assert not torch.allclose(out_shifted.decorrelation_loss, out.decorrelation_loss)


def test_bad_inputs():
    with pytest.raises(ValueError, match="layer index 3 does not exist: the model has 3 decoder layers"):
        config = SinkDecorrelationConfig(base_config=LoraConfig(target_modules=["q_proj"]), layers=[3])
        get_peft_model(make_lm(), config)
    with pytest.raises(ValueError, match="layers must be"):
        SinkDecorrelationConfig(layers="middle")
    with pytest.raises(ValueError, match="weight must be >= 0"):
        SinkDecorrelationConfig(weight=-1.0)
    model = sink_model(weight=0.1)
    data = batch()
    data["input_ids"][1, 0] = 5  # the second sequence lost its BOS
    with pytest.raises(ValueError, match=r"sequences \[1\] contain no BOS token"):
        model(**data)
    embeds = model.get_input_embeddings()(batch()["input_ids"])
    with pytest.raises(ValueError, match="without input_ids"):
        model(inputs_embeds=embeds)
    with pytest.raises(ValueError, match="point at padding"):
        model(**batch(), bos_positions=torch.tensor([0, 6]))


def test_sequences_without_valid_tokens_contribute_nothing():
    model = sink_model(weight=1.0)
    data = batch()
    only_first = {k: v[:1] for k, v in data.items()}
    data["attention_mask"][1] = 0  # an all-padding row: no BOS, no tokens -> ignored
    data["labels"][1] = -100
    torch.testing.assert_close(model(**data).decorrelation_loss, model(**only_first).decorrelation_loss)
    bos_only = {"input_ids": data["input_ids"][:, :1], "attention_mask": torch.ones(2, 1, dtype=torch.long)}
    out = model(**bos_only)  # nothing but BOS: the loss is a graph-connected 0
    assert out.decorrelation_loss.item() == 0 and out.decorrelation_loss.requires_grad


def test_disable_adapter_and_unload_remove_the_loss():
    model = sink_model(weight=0.1)
    with model.disable_adapter():
        assert not hasattr(model(**batch()), "decorrelation_loss")
    assert hasattr(model(**batch()), "decorrelation_loss")
    adapted_logits = model.eval()(**batch()).logits
    base = model.merge_and_unload()  # the inner LoRA merges as usual
    assert not base._forward_hooks and not base._forward_pre_hooks
    torch.testing.assert_close(base(**batch()).logits, adapted_logits, rtol=1e-4, atol=1e-5)


def test_a_failed_forward_leaves_no_hooks_behind():
    model = sink_model(weight=0.1)
    data = batch()
    bad = dict(data, input_ids=data["input_ids"].clone())
    bad["input_ids"][0, 1] = VOCAB + 5  # out of the vocabulary: the embedding raises inside the forward
    with pytest.raises(IndexError):
        model(**bad)
    assert all(len(layer._forward_hooks) == 0 for layer in model.get_base_model().model.layers)
    torch.testing.assert_close(model(**data).loss, sink_model(weight=0.1)(**data).loss)


def test_distributed_data_parallel(tmp_path):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        plain, wrapped = sink_model(weight=1.0), sink_model(weight=1.0)
        ddp = DistributedDataParallel(wrapped)
        for _ in range(2):  # the reducer must see every adapter gradient on every step
            out = ddp(**batch())
            out.loss.backward()
        plain(**batch()).loss.backward()
        grads = lora_grads(wrapped)
        for name, grad in lora_grads(plain).items():
            torch.testing.assert_close(grads[name], 2 * grad, rtol=1e-4, atol=1e-6)
        assert out.decorrelation_loss.item() > 0
    finally:
        dist.destroy_process_group()

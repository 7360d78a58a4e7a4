"""SinkDecorrelationModel on tiny random-init causal LMs: loss parts, gradients, padding, weight=0, modes, errors."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, PeftModelForCausalLM, get_peft_model

from peft_gnnmoe import SinkDecorrelationConfig, SinkDecorrelationModel


def lora_grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if "lora_" in n}


def test_forward_reports_parts_and_total(sink_model, lm_batch):
    model = sink_model(weight=0.5)
    assert isinstance(model.base_model, SinkDecorrelationModel)
    out = model(**lm_batch())
    assert out.decorrelation_loss.item() > 0
    torch.testing.assert_close(out.loss, out.ce_loss + 0.5 * out.decorrelation_loss)
    parts = model.last_loss_parts
    assert set(parts["per_layer"]) == {0, 1, 2}
    torch.testing.assert_close(parts["decorrelation_loss"], torch.stack(list(parts["per_layer"].values())).mean())


def test_per_sample_terms_are_weighted_like_the_cross_entropy(sink_model, lm_batch):
    model = sink_model(weight=0.5)
    out = model(**lm_batch(lengths=(7, 3)))
    per_sample = model.last_loss_parts["per_sample"]
    assert per_sample.shape == (2,)
    # the causal-LM loss counts labels[:, 1:] != -100: 6 and 2 items
    torch.testing.assert_close(out.decorrelation_loss, (6 * per_sample[0] + 2 * per_sample[1]) / 8)


def test_each_per_sample_term_depends_on_its_own_sequence_only(sink_model, lm_batch):
    model = sink_model(weight=0.5)
    data = lm_batch(lengths=(7, 5))
    model(**data)
    together = model.last_loss_parts["per_sample"]
    other = lm_batch(seed=3, lengths=(7, 5))
    data_changed = {k: torch.cat([v[:1], other[k][1:]]) for k, v in data.items()}  # the second sequence replaced
    model(**data_changed)
    changed = model.last_loss_parts["per_sample"]
    torch.testing.assert_close(changed[0], together[0], rtol=1e-5, atol=1e-7)
    assert not torch.allclose(changed[1], together[1])


def test_gradients_reach_inner_lora_adapter(sink_model, lm_batch):
    model = sink_model(weight=1.0)
    data = lm_batch()
    data.pop("labels")  # the decorrelation loss alone
    with pytest.warns(UserWarning, match="has no loss"):
        out = model(**data)
    assert out.loss is None
    out.decorrelation_loss.backward()
    grads = lora_grads(model)
    assert grads
    assert all(g.abs().sum() > 0 for g in grads.values())
    assert all(p.grad is None for n, p in model.named_parameters() if "lora_" not in n)


def test_padding_side_invariance(sink_model, lm_batch):
    def batch(**kwargs):
        data = lm_batch(**kwargs)
        # BOS's label is -100, so the causal-LM loss counts the same items (and gives the same weights) on both sides
        data["labels"][data["input_ids"] == 1] = -100
        return data

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


def test_weight_zero_is_exactly_the_inner_lora(make_lm, sink_model, lm_batch):
    sink = sink_model(weight=0.0)
    lora = get_peft_model(make_lm(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"])).train()
    lora.load_state_dict(sink.state_dict())
    data = lm_batch()
    out_sink, out_lora = sink(**data), lora(**data)
    assert torch.equal(out_sink.loss, out_lora.loss)
    assert not hasattr(out_sink, "decorrelation_loss")
    out_sink.loss.backward()
    out_lora.loss.backward()
    grads_sink, grads_lora = lora_grads(sink), lora_grads(lora)
    assert grads_sink.keys() == grads_lora.keys()
    for key, grad in grads_sink.items():
        assert torch.equal(grad, grads_lora[key]), key


def test_bf16_autocast(sink_model, lm_batch):
    model = sink_model(weight=1.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(**lm_batch())
    assert torch.isfinite(out.loss)
    assert out.decorrelation_loss.dtype == torch.float32
    out.loss.backward()
    for name, grad in lora_grads(model).items():
        assert torch.isfinite(grad).all(), name
        assert grad.abs().sum() > 0, name


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma", "gpt2"])
def test_architectures(arch, sink_model, lm_batch):
    model = sink_model(arch, weight=0.1, layers=[0, -1])
    out = model(**lm_batch())
    assert 0 < out.decorrelation_loss.item() <= 1
    assert sorted(model.last_loss_parts["per_layer"]) == [0, 2]
    out.loss.backward()
    assert all(g.abs().sum() > 0 for g in lora_grads(model).values())


def test_return_dict_false_gets_the_term_too(sink_model, lm_batch):
    model = sink_model(weight=0.5)
    data = lm_batch()
    as_dict = model(**data)
    as_tuple = model(**data, return_dict=False)
    torch.testing.assert_close(as_tuple[0], as_dict.loss)


def test_causal_lm_task_type_and_inputs_embeds_with_explicit_bos(make_lm, lm_batch):
    lm = make_lm("qwen2")  # Qwen2 has no bos_token_id
    config = SinkDecorrelationConfig(
        base_config=LoraConfig(r=4, target_modules=["q_proj"]), task_type="CAUSAL_LM", bos_token_id=None
    )
    lm.config.bos_token_id = None
    model = get_peft_model(lm, config).train()
    assert isinstance(model, PeftModelForCausalLM)
    data = lm_batch()
    with pytest.raises(ValueError, match="no bos_token_id"):
        model(**data)
    embeds = model.get_input_embeddings()(data["input_ids"])
    # e.g. two multimodal frames in front of the text: BOS is at position 0 here, told explicitly
    mask, labels = data["attention_mask"], data["labels"]
    out = model(inputs_embeds=embeds, attention_mask=mask, labels=labels, bos_positions=0)
    assert out.decorrelation_loss.item() > 0
    with pytest.warns(UserWarning, match="has no loss"):
        out_shifted = model(inputs_embeds=embeds, attention_mask=mask, bos_positions=torch.tensor([1, 2]))
    assert not torch.allclose(out_shifted.decorrelation_loss, out.decorrelation_loss)


def test_bad_inputs(make_lm, sink_model, lm_batch):
    with pytest.raises(ValueError, match="layer index 3 does not exist: the model has 3 decoder layers"):
        config = SinkDecorrelationConfig(base_config=LoraConfig(target_modules=["q_proj"]), layers=[3])
        get_peft_model(make_lm(), config)
    model = sink_model(weight=0.1)
    data = lm_batch()
    data["input_ids"][1, 0] = 5  # the second sequence lost its BOS
    with pytest.raises(ValueError, match=r"sequences \[1\] contain no BOS token"):
        model(**data)
    embeds = model.get_input_embeddings()(lm_batch()["input_ids"])
    with pytest.raises(ValueError, match="without input_ids"):
        model(inputs_embeds=embeds)
    with pytest.raises(ValueError, match="point at padding"):
        model(**lm_batch(), bos_positions=torch.tensor([0, 6]))


def test_sequences_without_valid_tokens_contribute_nothing(sink_model, lm_batch):
    model = sink_model(weight=1.0)
    data = lm_batch()
    only_first = {k: v[:1] for k, v in data.items()}
    data["attention_mask"][1] = 0  # an all-padding row: no BOS, no tokens -> ignored
    data["labels"][1] = -100
    torch.testing.assert_close(model(**data).decorrelation_loss, model(**only_first).decorrelation_loss)
    bos_only = {"input_ids": data["input_ids"][:, :1], "attention_mask": torch.ones(2, 1, dtype=torch.long)}
    with pytest.warns(UserWarning, match="selects no token"):
        out = model(**bos_only)  # nothing but BOS: the loss is a graph-connected 0
    assert out.decorrelation_loss.item() == 0
    assert out.decorrelation_loss.requires_grad


def test_disable_adapter_and_unload_remove_the_loss(sink_model, lm_batch):
    model = sink_model(weight=0.1)
    with model.disable_adapter():
        assert not hasattr(model(**lm_batch()), "decorrelation_loss")
    assert hasattr(model(**lm_batch()), "decorrelation_loss")
    adapted_logits = model.eval()(**lm_batch()).logits
    base = model.merge_and_unload()  # the inner LoRA merges as usual
    assert not base._forward_hooks
    assert not base._forward_pre_hooks
    torch.testing.assert_close(base(**lm_batch()).logits, adapted_logits, rtol=1e-4, atol=1e-5)

"""The decorrelation loss against a hand computation, and its token bookkeeping (BOS, masks, layer selection)."""

from __future__ import annotations

import math

import pytest
import torch
from peft import LoraConfig, get_peft_model

from peft_gnnmoe.tuners.sink_decorrelation import (
    cosine_to_bos,
    decorrelation_token_mask,
    find_bos_positions,
    layer_decorrelation_loss,
)
from peft_gnnmoe.tuners.sink_decorrelation.loss import layer_penalty_sums, reduce_layer_sums
from peft_gnnmoe.utils.model_introspection import find_decoder_layers, resolve_layer_indices


def _reference(hidden: list[torch.Tensor], mask: torch.Tensor, bos: list[int], form: str) -> float:
    """Plain-Python loss: per layer, mean over valid non-BOS tokens of the batch of f(cos); then mean over layers."""
    per_layer = []
    for h in hidden:
        total, count = 0.0, 0
        for b in range(h.shape[0]):
            anchor = h[b, bos[b]].detach().double()
            for t in range(h.shape[1]):
                if mask[b, t] and t != bos[b]:
                    x = h[b, t].detach().double()
                    cos = float(x @ anchor) / math.sqrt(float(x @ x) * float(anchor @ anchor))
                    total += cos**2 if form == "squared" else abs(cos)
                    count += 1
        per_layer.append(total / count)
    return sum(per_layer) / len(per_layer)


@pytest.mark.parametrize("form", ["squared", "abs"])
def test_loss_equals_hand_computation(form, make_lm, sink_model, lm_batch):
    model = sink_model(weight=0.3, layers=[0, 2], form=form)
    data = lm_batch(lengths=(7, 4), pad_side="left")
    data["labels"][1, 3] = -100  # BOS's label: CE then counts 6 and 3 items, as many as the loss's tokens
    out = model(**data)

    # the same model without the wrapper: capture the two layers' outputs with plain hooks, compute CE the usual way
    plain = get_peft_model(make_lm(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"])).train()
    plain.load_state_dict(model.state_dict())
    captured = {}
    layers = plain.get_base_model().model.layers
    handles = [layers[i].register_forward_hook(lambda m, a, o, i=i: captured.__setitem__(i, o)) for i in (0, 2)]
    ce = plain(**data).loss
    for handle in handles:
        handle.remove()
    expected = _reference([captured[0], captured[2]], data["attention_mask"], bos=[0, 3], form=form)

    assert out.decorrelation_loss.item() == pytest.approx(expected, rel=1e-5)
    assert out.loss.item() == pytest.approx(ce.item() + 0.3 * expected, rel=1e-5)


def test_layer_loss_on_constructed_vectors():
    # BOS = e0; token 1 at 60 degrees (cos 0.5), token 2 orthogonal, token 3 opposite (cos -1), token 4 padding
    h = torch.tensor([[[1.0, 0.0], [0.5, math.sqrt(3) / 2], [0.0, 2.0], [-3.0, 0.0], [5.0, 5.0]]])
    valid = torch.tensor([[True, True, True, True, False]])
    bos = torch.tensor([0])
    mask = decorrelation_token_mask(valid, bos)
    assert mask.tolist() == [[False, True, True, True, False]]
    assert layer_decorrelation_loss(h, bos, mask, "squared").item() == pytest.approx((0.25 + 0 + 1) / 3)
    assert layer_decorrelation_loss(h, bos, mask, "abs").item() == pytest.approx((0.5 + 0 + 1) / 3)


def test_sample_and_token_reductions_on_constructed_sums():
    sums = [torch.tensor([1.0, 0.0]), torch.tensor([3.0, 2.0])]  # two layers, two sequences
    counts = torch.tensor([2, 4])
    # per sequence: mean over layers of S_l / n  ->  [(0.5 + 1.5) / 2, (0 + 0.5) / 2]
    assert reduce_layer_sums(sums, counts, "sample").tolist() == [1.0, 0.25]
    # reference: per layer sum_b S / sum_b n, then the mean over layers  ->  (1/6 + 5/6) / 2
    assert reduce_layer_sums(sums, counts, "tokens").item() == pytest.approx(0.5)


def test_a_sequence_without_tokens_gets_zero_not_nan():
    assert reduce_layer_sums([torch.tensor([0.0, 2.0])], torch.tensor([0, 4]), "sample").tolist() == [0.0, 0.5]


def test_find_bos_positions():
    ids = torch.tensor([[0, 0, 1, 7, 8], [1, 7, 1, 8, 0], [0, 0, 0, 0, 0]])
    valid = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 0], [0, 0, 0, 0, 0]]).bool()
    # the first valid occurrence per row; an all-padding row gets 0 and is ignored downstream
    assert find_bos_positions(valid, ids, bos_token_id=1).tolist() == [2, 0, 0]
    assert find_bos_positions(valid, ids, bos="first").tolist() == [2, 0, 0]
    assert find_bos_positions(valid, None, bos_positions=torch.tensor([3, 1, 0])).tolist() == [3, 1, 0]
    ids[0, 3] = 9  # row 0 no longer holds a 7, row 1 still does
    with pytest.raises(ValueError, match=r"sequences \[0\] contain no BOS token \(id 7\)"):
        find_bos_positions(valid, ids, bos_token_id=7)
    with pytest.raises(ValueError, match="no bos_token_id"):
        find_bos_positions(valid, ids, bos_token_id=None)
    with pytest.raises(ValueError, match="out of range"):
        find_bos_positions(valid, ids, bos_positions=5)


def test_prefix_tokens_follow_the_labels():
    valid = torch.tensor([[1, 1, 1, 1, 1, 0]]).bool()
    labels = torch.tensor([[-100, -100, -100, 4, 5, -100]])
    mask = decorrelation_token_mask(valid, torch.tensor([0]), tokens="prefix", labels=labels)
    assert mask.tolist() == [[False, True, True, False, False, False]]


def test_layer_selection():
    assert resolve_layer_indices("all", 4) == [0, 1, 2, 3]
    assert resolve_layer_indices("all_but_last", 4) == [0, 1, 2]
    assert resolve_layer_indices([-1, 0, 0], 4) == [0, 3]
    with pytest.raises(ValueError, match="layer index -5 does not exist"):
        resolve_layer_indices([-5], 4)
    with pytest.raises(TypeError, match="must be ints"):
        resolve_layer_indices([1.0], 4)


@pytest.mark.parametrize(("arch", "path"), [("llama", "model.layers"), ("gpt2", "transformer.h")])
def test_decoder_layers_are_found(arch, path, make_lm):
    name, layers = find_decoder_layers(make_lm(arch))
    assert name == path
    assert len(layers) == 3
    with pytest.raises(ValueError, match="does not exist"):
        find_decoder_layers(make_lm(arch), layers_module="no.such.layers")


def test_fused_cosine_backward_matches_autograd():
    hidden = torch.randn(3, 6, 5, dtype=torch.double, requires_grad=True)
    bos = torch.tensor([0, 2, 5])
    assert torch.autograd.gradcheck(lambda h: cosine_to_bos(h, bos, 1e-12), (hidden,))

    def reference(h):
        anchor = h[torch.arange(3), bos]
        return torch.nn.functional.cosine_similarity(h, anchor[:, None], dim=-1)

    weights = torch.randn(3, 6, dtype=torch.double)
    (fused,) = torch.autograd.grad((cosine_to_bos(hidden, bos) * weights).sum(), hidden)
    (plain,) = torch.autograd.grad((reference(hidden) * weights).sum(), hidden)
    torch.testing.assert_close(fused, plain)
    # bf16 hidden states: float32 cosines, bf16 gradients of the right shape
    low = hidden.detach().bfloat16().requires_grad_()
    cos = cosine_to_bos(low, bos)
    assert cos.dtype == torch.float32
    torch.testing.assert_close(cos.double(), reference(hidden).detach(), atol=2e-2, rtol=0)
    (cos * weights.float()).sum().backward()
    assert low.grad.dtype == torch.bfloat16
    assert torch.isfinite(low.grad).all()


def test_layer_term_is_computed_on_the_hidden_states_device():
    # device_map="auto": a layer's output may live on another device than the masks built from the inputs; "meta"
    # stands in for that device (the check is about placement, so no values are needed)
    hidden = torch.randn(2, 5, 4, device="meta")
    bos, mask = torch.tensor([0, 1]), torch.ones(2, 5, dtype=torch.bool)
    sums = layer_penalty_sums(hidden, bos, mask)
    assert sums.device.type == "meta"
    assert sums.shape == (2,)
    assert layer_decorrelation_loss(hidden, bos, mask).device.type == "meta"


def test_layer_terms_from_several_devices_are_combined_on_the_counts_device():
    on_meta, on_cpu = torch.zeros(2, device="meta"), torch.tensor([1.0, 2.0])
    counts = torch.tensor([1, 2], device="meta")
    assert reduce_layer_sums([on_cpu, on_meta], counts, "sample").device.type == "meta"

"""The analyses on tiny random ViTs fed ``pixel_values``: CLS is position 0, attention is bidirectional."""

from __future__ import annotations

import json

import pytest
import torch

from peft_gnnmoe.analysis import (
    analyze,
    attention_sink_scores,
    bos_cosine_similarity,
    find_massive_activations,
    vision_token_labels,
)
from peft_gnnmoe.utils.model_introspection import find_decoder_layers

PATCHES = 16  # the conftest ViTs cut 32 px images into a 4x4 grid


def _planted(model, branch: str, layer: int, feature: int, value: float):
    """Add ``value`` to ``feature`` of every token at ``layer``'s attention output or MLP output (a bias)."""
    block = find_decoder_layers(model)[1][layer]
    module = block.mlp.fc2 if branch == "mlp" else block.attention.o_proj
    with torch.no_grad():
        module.bias[feature] = value
    return model


def _vit_with_cls_sink(make_vit):
    """A ViT whose first layer sends every query's attention (both heads) to the CLS token."""
    model = make_vit()
    embeddings, block = model.vit.embeddings, model.vit.layers[0]
    heads, head_dim = 2, 16
    with torch.no_grad():
        embeddings.position_embeddings.zero_()
        embeddings.cls_token.zero_()
        embeddings.cls_token[..., 0] = 5.0  # feature 0 marks CLS after layernorm_before
        embeddings.patch_embeddings.projection.weight[0] = 0.0
        embeddings.patch_embeddings.projection.bias[0] = 0.0
        block.layernorm_before.weight.fill_(1.0)
        block.layernorm_before.bias.zero_()
        q, k = block.attention.q_proj, block.attention.k_proj
        q.weight.zero_(), q.bias.zero_(), k.weight.zero_(), k.bias.zero_()
        for head in range(heads):
            q.bias[head * head_dim] = 10.0  # every query: the same direction
            k.weight[head * head_dim, 0] = 10.0  # keys: aligned with it only at CLS
    return model


def test_token_labels_start_with_the_prefix_tokens(make_vit_family, vit_family, images):
    name, prefix = vit_family
    labels = vision_token_labels(make_vit_family(name), images, prefix + PATCHES)
    assert (
        labels[:prefix] == {0: [], 1: ["CLS"], 2: ["CLS", "dist"], 5: ["CLS", "reg0", "reg1", "reg2", "reg3"]}[prefix]
    )


def test_token_labels_name_patches_by_row_and_column(make_vit_family, vit_family, images):
    name, prefix = vit_family
    labels = vision_token_labels(make_vit_family(name), images, prefix + PATCHES)
    assert labels[prefix:] == [f"p({r},{c})" for r in range(4) for c in range(4)]


def test_token_labels_reject_a_sequence_too_short_for_the_grid(make_vit, images):
    with pytest.raises(ValueError, match="4x4 patch grid"):
        vision_token_labels(make_vit(), images, PATCHES - 1)


@pytest.mark.filterwarnings("ignore:.*no CLS token:UserWarning")
def test_analyze_covers_every_token_of_every_family_model(make_vit_family, vit_family, images):
    name, prefix = vit_family
    report = analyze(make_vit_family(name), {"pixel_values": images})
    assert [len(row) for row in report["attention_sinks"]["mean_scores"]] == [prefix + PATCHES] * 2


def test_analyze_labels_the_image_tokens(make_vit_family, images):
    report = analyze(make_vit_family("dinov2_with_registers"), {"pixel_values": images})
    assert report["tokens"][1][:6] == ["CLS", "reg0", "reg1", "reg2", "reg3", "p(0,0)"]


def test_vision_attention_is_detected_as_bidirectional(make_vit_family, vit_family, images):
    name, _ = vit_family
    assert attention_sink_scores(make_vit_family(name), {"pixel_values": images}).causal is False


@pytest.mark.parametrize("name", ["vit", "dinov2"])
@pytest.mark.parametrize(("branch", "value"), [("mlp", 4000.0), ("attention", -3000.0)])
def test_planted_outlier_is_found_on_every_image_token_with_its_origin(make_vit_family, images, name, branch, value):
    model = _planted(make_vit_family(name), branch, layer=1, feature=5, value=value)
    report = find_massive_activations(model, {"pixel_values": images})
    assert report.origins == {branch: 2 * (1 + PATCHES)}  # both images, CLS and every patch, created at layer 1


@pytest.mark.parametrize("name", ["vit", "dinov2"])
def test_planted_outlier_is_at_its_layer_and_feature(make_vit_family, images, name):
    model = _planted(make_vit_family(name), "mlp", layer=1, feature=5, value=4000.0)
    report = find_massive_activations(model, {"pixel_values": images})
    assert {(m.layer, m.feature) for m in report.massive} == {(1, 5)}


def test_random_vit_has_no_massive_activation(make_vit, images):
    assert find_massive_activations(make_vit(), {"pixel_values": images}).massive == []


def test_planted_cls_sink_is_found_at_its_layer(make_vit, images):
    report = attention_sink_scores(_vit_with_cls_sink(make_vit), {"pixel_values": images})
    assert [report.sink_tokens(layer=0, batch=b) for b in (0, 1)] == [[0], [0]]


def test_planted_cls_sink_receives_all_the_attention(make_vit, images):
    report = attention_sink_scores(_vit_with_cls_sink(make_vit), {"pixel_values": images})
    assert report.layer_scores[0][0][0] == pytest.approx(1.0, abs=1e-3)


def test_vision_scores_average_over_every_query(make_vit, images):
    model = make_vit()
    report = attention_sink_scores(model, {"pixel_values": images})
    model.set_attn_implementation("eager")
    with torch.no_grad():
        attentions = model(pixel_values=images, output_attentions=True).attentions
    expected = attentions[1][0].mean(dim=(0, 1))  # heads, then all 17 queries
    assert report.layer_scores[0][1] == pytest.approx(expected.tolist(), abs=1e-4)


def test_vision_baseline_is_one_over_the_token_count(make_vit, images):
    report = attention_sink_scores(make_vit(), {"pixel_values": images})
    assert report.baseline[0] == pytest.approx([1 / 17] * 17, abs=1e-4)


def test_cosine_reference_is_the_cls_token(make_vit_family, images):
    model = make_vit_family("dinov2")
    report = bos_cosine_similarity(model, {"pixel_values": images}, layers=[1])
    with torch.no_grad():
        hidden = model(pixel_values=images, output_hidden_states=True).hidden_states[2][1]
    expected = torch.nn.functional.cosine_similarity(hidden, hidden[:1], dim=-1)
    assert report.cosine[1][0] == pytest.approx(expected.tolist(), abs=1e-4)


def test_cosine_report_puts_bos_at_position_zero(make_vit, images):
    assert bos_cosine_similarity(make_vit(), {"pixel_values": images}).bos_positions == [0, 0]


def test_cosine_mean_leaves_out_the_cls_token(make_vit, images):
    model = make_vit()
    report = bos_cosine_similarity(model, {"pixel_values": images}, layers=[0])
    patches = [v for row in report.cosine for v in row[0][1:]]
    assert report.mean == pytest.approx(sum(patches) / len(patches), abs=1e-4)


def test_cosine_without_cls_token_warns(make_vit_family, images):
    with pytest.warns(UserWarning, match="no CLS token"):
        bos_cosine_similarity(make_vit_family("siglip_vision"), {"pixel_values": images})


def test_cosine_rejects_bos_token_for_images(make_vit, images):
    with pytest.raises(ValueError, match="CLS token"):
        bos_cosine_similarity(make_vit(), {"pixel_values": images}, bos="token")


def test_cosine_rejects_a_reference_outside_the_image_sequence(make_vit, images):
    with pytest.raises(ValueError, match="out of range"):
        bos_cosine_similarity(make_vit(), {"pixel_values": images}, bos_positions=17)


def test_image_batch_with_attention_mask_is_rejected(make_vit, images):
    with pytest.raises(ValueError, match="drop attention_mask"):
        find_massive_activations(make_vit(), {"pixel_values": images, "attention_mask": torch.ones(2, 17)})


def test_vision_report_is_json_serialisable(make_vit, images):
    json.dumps(analyze(make_vit(), {"pixel_values": images}))


def test_token_norms_are_the_hidden_state_norms(make_vit, images):
    model = make_vit()
    report = find_massive_activations(model, {"pixel_values": images})
    with torch.no_grad():
        hidden = model(pixel_values=images, output_hidden_states=True).hidden_states[1]
    assert report.layers[0].norms[1] == pytest.approx(hidden[1].norm(dim=-1).tolist(), abs=1e-3)


def test_gnnmoe_model_at_init_reports_the_base_model_norms(make_vit_family, images):
    from peft import get_peft_model

    from peft_gnnmoe import GNNMoEConfig

    base = find_massive_activations(make_vit_family("dinov2"), {"pixel_values": images})
    model = get_peft_model(make_vit_family("dinov2"), GNNMoEConfig(target_modules=["q_proj", "v_proj"]))
    wrapped = find_massive_activations(model, {"pixel_values": images})
    assert torch.allclose(torch.tensor(wrapped.layers[1].norms), torch.tensor(base.layers[1].norms), atol=1e-3)

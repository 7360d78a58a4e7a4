"""Token layouts that are not a plain patch grid: correct behaviour or a clear error, never a silent guess."""

import pytest
import torch
import transformers as T
from peft import get_peft_model

from peft_gnnmoe import GNNMoEConfig, get_expert_assignments

_MAE = dict(
    hidden_size=32,
    num_hidden_layers=1,
    num_attention_heads=2,
    intermediate_size=64,
    image_size=32,
    patch_size=8,
    decoder_hidden_size=32,
    decoder_num_hidden_layers=1,
    decoder_num_attention_heads=2,
    decoder_intermediate_size=64,
    mask_ratio=0.75,
)


def _mae(model_cls=T.ViTMAEModel):
    torch.manual_seed(0)
    return model_cls(T.ViTMAEConfig(**_MAE))


def test_vit_mae_counts_cls_as_a_special_token_and_places_no_grid(images):
    model = get_peft_model(_mae(), GNNMoEConfig(graph="knn"))
    model(pixel_values=images)
    assignments = get_expert_assignments(model)
    assert len(assignments) == 1
    for info in assignments.values():
        assert info["num_prefix_tokens"] == 1  # CLS
        assert info["grid"] is None  # 4 kept patches in random order: no square grid
        assert info["topk_index"].shape == (2, 1 + 4, 2)


@pytest.mark.parametrize("graph", ["grid", "knn+grid"])
@pytest.mark.parametrize("num_prefix_tokens", [None, 1])
def test_vit_mae_encoder_refuses_grid_graphs(graph, num_prefix_tokens):
    config = GNNMoEConfig(
        target_modules=["q_proj", "k_proj", "v_proj"], graph=graph, num_prefix_tokens=num_prefix_tokens
    )
    with pytest.raises(
        ValueError, match=r"shuffles \(and drops\) the patch tokens .* Use GNNMoEConfig\(graph='knn'\)"
    ):
        get_peft_model(_mae(), config)


def test_vit_mae_decoder_sees_patches_in_grid_order(images):
    targets = r".*decoder.*\.(q_proj|k_proj|v_proj)"
    model = get_peft_model(_mae(T.ViTMAEForPreTraining), GNNMoEConfig(target_modules=targets, graph="knn+grid"))
    model(pixel_values=images)
    for info in get_expert_assignments(model).values():
        assert info["num_prefix_tokens"] == 1
        assert info["grid"] == (4, 4)


def test_too_many_special_tokens_is_an_error_not_clamped(make_vit, images):
    model = get_peft_model(make_vit(), GNNMoEConfig(num_prefix_tokens=100, graph="knn"))
    with pytest.raises(ValueError, match="expects 100 special tokens"):
        model(pixel_values=images)


def test_explicit_patch_grid_that_does_not_match_the_patches_is_an_error(make_vit, images):
    model = get_peft_model(make_vit(), GNNMoEConfig(patch_grid=[3, 5], graph="grid"))
    with pytest.raises(ValueError, match=r"patch_grid=\[3, 5\]\) holds 15 patches.*16 patch tokens"):
        model(pixel_values=images)


def test_explicit_patch_grid_is_used_when_it_matches(make_vit):
    model = get_peft_model(make_vit(image_size=64), GNNMoEConfig(patch_grid=[8, 8], graph="grid"))
    model(pixel_values=torch.randn(1, 3, 64, 64))
    for info in get_expert_assignments(model).values():
        assert info["grid"] == (8, 8)


def test_patch_grid_with_the_wrong_aspect_is_refused(make_vit):
    with pytest.raises(ValueError, match=r"contradicts the model config.*4 x 4"):
        get_peft_model(make_vit(), GNNMoEConfig(patch_grid=[2, 8]))


def test_knn_plus_grid_without_a_grid_is_an_error_not_a_silent_knn():
    config = T.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    model = get_peft_model(T.BertModel(config), GNNMoEConfig(target_modules=["query"], graph="knn+grid"))
    with pytest.raises(ValueError, match="cannot place 7 patch tokens.*graph='knn'"):
        model(input_ids=torch.randint(1, 50, (2, 7)))


def test_packed_text_rows_are_refused_not_linked_across_sequences():
    config = T.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    model = get_peft_model(T.BertModel(config), GNNMoEConfig(target_modules=["query"], graph="knn"))
    ids = torch.randint(1, 50, (1, 7))
    model(input_ids=ids, position_ids=torch.arange(7)[None])  # one sequence: fine
    with pytest.raises(ValueError, match="several packed sequences.*packing=False"):
        model(input_ids=ids, position_ids=torch.tensor([[0, 1, 2, 0, 1, 2, 3]]))
    model(input_ids=ids, position_ids=torch.tensor([[0, 1, 2, 0, 1, 2, 3]]), attention_mask=torch.ones(1, 7))

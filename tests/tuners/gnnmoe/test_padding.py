"""Padding on a sequence model: padded tokens are no graph nodes and count in no loss, left or right padded."""

import pytest
import torch
from peft import get_peft_model
from transformers import BertConfig, BertModel

from peft_gnnmoe import GNNMoEConfig, get_aux_loss, get_expert_assignments, get_routing_stats
from peft_gnnmoe.tuners.gnnmoe.graph import TokenLayout, build_token_graph

PAD = 0


def _bert(seed: int = 0):
    torch.manual_seed(seed)
    config = BertConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        vocab_size=50,
        pad_token_id=PAD,
    )
    adapter = GNNMoEConfig(target_modules=["query", "key", "value"], graph="knn", knn_k=8, init_weights=False)
    return get_peft_model(BertModel(config), adapter).eval()


def _sequences() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(5)
    return [torch.randint(1, 50, (length,), generator=generator) for length in (7, 4)]


def _padded(sequences, length: int, side: str) -> dict[str, torch.Tensor]:
    ids = torch.full((len(sequences), length), PAD)
    mask = torch.zeros_like(ids)
    for row, seq in enumerate(sequences):
        span = slice(0, len(seq)) if side == "right" else slice(length - len(seq), length)
        ids[row, span], mask[row, span] = seq, 1
    positions = (mask.cumsum(1) - 1).clamp_min(0)  # real tokens keep positions 0.. whatever the padding side
    return {"input_ids": ids, "attention_mask": mask, "position_ids": positions}


def _alone(model, seq):
    with torch.no_grad():
        hidden = model(input_ids=seq[None]).last_hidden_state[0]
    return hidden, get_aux_loss(model)


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("length", [7, 9, 12])
def test_real_tokens_do_not_depend_on_padding(side, length):
    model = _bert()
    sequences = _sequences()
    alone = [_alone(model, seq) for seq in sequences]
    batch = _padded(sequences, length, side)
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    for row in range(len(sequences)):
        real = batch["attention_mask"][row].bool()
        torch.testing.assert_close(hidden[row][real], alone[row][0], rtol=1e-5, atol=1e-5)
    # with no labels every sequence weighs 1/B: the aux loss is the mean of the sequences' own losses
    expected_aux = torch.stack([aux for _, aux in alone]).mean()
    torch.testing.assert_close(get_aux_loss(model), expected_aux, rtol=1e-5, atol=1e-7)


def test_padding_enters_neither_statistics_nor_assignments():
    model = _bert()
    sequences = [_sequences()[0]] * 2
    with torch.no_grad():
        model(input_ids=torch.stack(sequences))
    unpadded = get_routing_stats(model)
    with torch.no_grad():
        model(**_padded(sequences, 12, "left"))
    padded = get_routing_stats(model)
    assert padded.keys() == unpadded.keys()
    for name in unpadded:
        for key in ("load", "entropy", "balance_loss", "z_loss"):
            torch.testing.assert_close(torch.tensor(padded[name][key]), torch.tensor(unpadded[name][key]), msg=key)
    for info in get_expert_assignments(model).values():
        assert info["valid"].sum(1).tolist() == [7, 7]


def test_padded_tokens_have_no_edges_and_are_no_knn_candidates():
    x = torch.randn(2, 6, 8)
    x[0, 4:] = x[0, 0]  # padding that looks exactly like a real token would be its nearest neighbour
    valid = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    edges = build_token_graph(x, TokenLayout(1, None), "knn", knn_k=8, prefix_mode="connect", valid=valid)
    nodes = valid.flatten()
    assert nodes[edges[0]].all()  # no message leaves a padded token
    assert nodes[edges[1]].all()  # no message reaches one
    adj = torch.zeros(12, 12, dtype=torch.bool)
    adj[edges[1], edges[0]] = True
    assert adj[1:4, 1:4].sum() == 3 * 2  # the 3 real patches of row 0 link to each other (fewer than k exist)
    assert adj[0, 1:4].all()  # the prefix token links to the real patches only
    assert not adj[0, 4:6].any()

"""The paper's graph modes (grid8, radius, full and the unions) and the token router, from adjacency to a model."""

import pytest
import torch
from peft import get_peft_model

from peft_gnnmoe import GNNMoEConfig, get_expert_assignments
from peft_gnnmoe.tuners.gnnmoe.graph import TokenLayout, infer_layout, needs_grid, token_adjacency

NEW_MODES = ["grid8", "knn+grid8", "radius", "full"]


def _adj(mode, grid, prefix=0, prefix_mode="connect", valid=None, radius=2.0, knn_k=2, batch=1, seed=0):
    generator = torch.Generator().manual_seed(seed)
    patches = torch.randn(batch, grid[0] * grid[1], 5, generator=generator)  # the same patches with any prefix
    x = torch.cat([torch.randn(batch, prefix, 5, generator=generator), patches], dim=1)
    return token_adjacency(x, TokenLayout(prefix, grid), mode, knn_k, prefix_mode, valid, radius)


def _neighbours(adj, node):
    return set(adj[node].nonzero().flatten().tolist())


def test_grid8_on_3x3_links_the_eight_neighbours():
    adj = _adj("grid8", (3, 3))[0]
    assert adj.sum(1).view(3, 3).tolist() == [[3, 5, 3], [5, 8, 5], [3, 5, 3]]
    assert _neighbours(adj, 0) == {1, 3, 4}  # right, down, diagonal
    assert _neighbours(adj, 4) == {0, 1, 2, 3, 5, 6, 7, 8}
    assert torch.equal(adj, adj.T)


def test_radius_2_on_4x4_by_hand():
    adj = _adj("radius", (4, 4), radius=2.0)[0]
    # (0, 0): (0, 1), (0, 2), (1, 0), (2, 0) and (1, 1); (1, 2) and (2, 1) are sqrt(5) > 2 away
    assert _neighbours(adj, 0) == {1, 2, 4, 8, 5}
    # (1, 1) = node 5: its 8 neighbours, plus (1, 3) and (3, 1) at distance 2; (0, 3), (2, 3), (3, 0), (3, 2) are
    # sqrt(5) away, (3, 3) sqrt(8)
    assert _neighbours(adj, 5) == {0, 1, 2, 4, 6, 8, 9, 10} | {7, 13}
    assert not adj.diagonal().any()
    assert torch.equal(adj, adj.T)


def test_radius_1_is_the_4_neighbour_grid_and_1_5_the_8_neighbour_grid():
    assert torch.equal(_adj("radius", (4, 4), radius=1.0), _adj("grid", (4, 4)))
    assert torch.equal(_adj("radius", (4, 4), radius=1.5), _adj("grid8", (4, 4)))
    assert torch.equal(_adj("radius", (3, 4), radius=0.5), torch.zeros(1, 12, 12, dtype=torch.bool))


def test_full_links_every_patch_to_every_other():
    adj = _adj("full", (3, 3))[0]
    assert torch.equal(adj, ~torch.eye(9, dtype=torch.bool))


def test_knn_plus_grid8_is_the_union():
    knn = _adj("knn", (4, 4), batch=2)
    grid8 = _adj("grid8", (4, 4), batch=2)
    union = _adj("knn+grid8", (4, 4), batch=2)
    assert torch.equal(union, knn | grid8)
    assert not torch.equal(union, grid8)  # the kNN part adds edges beyond the 8 neighbours


@pytest.mark.parametrize("mode", NEW_MODES)
def test_prefix_tokens_connect_or_stay_out_of_the_patch_graph(mode):
    connected = _adj(mode, (3, 3), prefix=2, prefix_mode="connect")[0]
    isolated = _adj(mode, (3, 3), prefix=2, prefix_mode="isolated")[0]
    assert connected[:2].sum(1).tolist() == [10, 10]  # every patch and the other special token
    assert not isolated[:2].any()
    assert not isolated[:, :2].any()
    assert torch.equal(isolated[2:, 2:], connected[2:, 2:])
    assert torch.equal(isolated[2:, 2:], _adj(mode, (3, 3))[0])  # the patch graph ignores the special tokens


@pytest.mark.parametrize("mode", NEW_MODES)
def test_padding_is_no_graph_node(mode):
    valid = torch.ones(2, 1 + 16, dtype=torch.bool)
    valid[1, -5:] = False
    adj = _adj(mode, (4, 4), prefix=1, valid=valid, batch=2)
    assert not adj[1, -5:].any()
    assert not adj[1, :, -5:].any()
    assert torch.equal(adj[0], _adj(mode, (4, 4), prefix=1, batch=2)[0])  # the unpadded image keeps its graph


@pytest.mark.parametrize("mode", ["grid8", "knn+grid8", "radius"])
def test_spatial_modes_need_a_grid(mode):
    assert needs_grid(mode)
    with pytest.raises(ValueError, match="patch_grid"):
        infer_layout(7, 0, None, need_grid=needs_grid(mode))


@pytest.mark.parametrize("mode", ["knn", "full"])
def test_knn_and_full_need_no_grid(mode):
    assert not needs_grid(mode)


def test_grid_mode_on_tokens_without_a_grid_fails_when_routing(make_vit, images):
    model = get_peft_model(make_vit(), GNNMoEConfig(graph="radius", patch_grid=[3, 5]))
    with pytest.raises(ValueError, match="patch_grid"):
        model(pixel_values=images)


@pytest.mark.parametrize("config", [dict(graph=m) for m in NEW_MODES] + [dict(router="linear")], ids=str)
def test_new_modes_route_end_to_end_on_the_vit_family(config, vit_family, make_vit_family, images):
    name, prefix = vit_family
    model = get_peft_model(make_vit_family(name), GNNMoEConfig(init_weights=False, graph_radius=1.5, **config))
    model.train()
    outputs = model(pixel_values=images)
    out = outputs.logits if hasattr(outputs, "logits") else outputs.last_hidden_state
    out.float().pow(2).mean().backward()
    assignments = get_expert_assignments(model)
    assert len(assignments) == 2  # one shared router per block
    first = next(iter(assignments.values()))
    assert first["topk_index"].shape == (2, prefix + 16, 2)
    assert first["num_prefix_tokens"] == prefix
    grads = [p.grad for n, p in model.named_parameters() if "gnnmoe_router" in n and n.endswith("head.weight")]
    assert len(grads) == 2
    for grad in grads:
        assert grad is not None
        assert grad.abs().sum() > 0


def test_linear_router_ignores_the_graph_mode_and_needs_no_grid(make_vit, images):
    base = make_vit()
    config = dict(router="linear", init_weights=False)
    with_grid = get_peft_model(base, GNNMoEConfig(graph="knn+grid", **config)).eval()
    with torch.no_grad():
        want = with_grid(pixel_values=images).logits
    state = {k: v.clone() for k, v in with_grid.state_dict().items()}
    no_grid = get_peft_model(with_grid.unload(), GNNMoEConfig(graph="radius", patch_grid=[3, 5], **config)).eval()
    no_grid.load_state_dict(state)
    with torch.no_grad():
        got = no_grid(pixel_values=images).logits
    torch.testing.assert_close(got, want, rtol=0, atol=0)

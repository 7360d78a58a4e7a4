import pytest
import torch

from peft_gnnmoe.tuners.gnnmoe.graph import TokenLayout, build_token_graph, infer_layout


def _adjacency(edge_index, num_nodes):
    adj = torch.zeros(num_nodes, num_nodes, dtype=torch.bool)
    adj[edge_index[1], edge_index[0]] = True
    return adj


def test_grid_graph_degrees_and_symmetry():
    x = torch.randn(1, 12, 8)  # 3 x 4 patches, no special tokens
    ei = build_token_graph(x, TokenLayout(0, (3, 4)), "grid", knn_k=1, prefix_mode="connect")
    adj = _adjacency(ei, 12)
    assert torch.equal(adj, adj.T)
    degree = adj.sum(1).view(3, 4)
    assert degree.tolist() == [[2, 3, 3, 2], [3, 4, 4, 3], [2, 3, 3, 2]]
    assert adj[0, 1]  # right neighbour
    assert adj[0, 4]  # down neighbour
    assert not adj[0, 5]  # no diagonal


def test_knn_links_each_patch_to_its_most_similar_patches():
    # two clusters of patches: features point in two orthogonal directions (plus tiny noise)
    torch.manual_seed(0)
    base = torch.zeros(8, 4)
    base[:4, 0] = 1.0
    base[4:, 1] = 1.0
    x = (base + 0.01 * torch.randn(8, 4)).unsqueeze(0)
    ei = build_token_graph(x, TokenLayout(0, None), "knn", knn_k=3, prefix_mode="connect")
    adj = _adjacency(ei, 8)
    assert torch.equal(adj, adj.T)
    assert adj[:4, :4].sum(1).tolist() == [3, 3, 3, 3]  # every patch found its 3 cluster mates
    assert not adj[:4, 4:].any()
    assert not adj.diagonal().any()


def test_prefix_tokens_connect_or_isolated():
    x = torch.randn(1, 1 + 9, 8)
    layout = TokenLayout(1, (3, 3))
    connected = _adjacency(build_token_graph(x, layout, "grid", 2, "connect"), 10)
    assert connected[0, 1:].all()
    assert connected[1:, 0].all()
    assert not connected[0, 0]
    isolated = _adjacency(build_token_graph(x, layout, "grid", 2, "isolated"), 10)
    assert not isolated[0].any()
    assert not isolated[:, 0].any()
    assert torch.equal(isolated[1:, 1:], connected[1:, 1:])


def test_batched_graph_has_no_edges_across_images():
    x = torch.randn(3, 1 + 16, 8)
    ei = build_token_graph(x, TokenLayout(1, (4, 4)), "knn+grid", 4, "connect")
    assert torch.equal(ei[0] // 17, ei[1] // 17)
    assert set((ei[1] // 17).tolist()) == {0, 1, 2}


def test_knn_plus_grid_is_the_union_without_duplicates():
    x = torch.randn(2, 16, 8)
    layout = TokenLayout(0, (4, 4))
    knn = _adjacency(build_token_graph(x, layout, "knn", 3, "connect"), 32)
    grid = _adjacency(build_token_graph(x, layout, "grid", 3, "connect"), 32)
    ei = build_token_graph(x, layout, "knn+grid", 3, "connect")
    assert torch.equal(_adjacency(ei, 32), knn | grid)
    assert ei.shape[1] == int((knn | grid).sum())  # no duplicated edges


def test_infer_layout():
    assert infer_layout(1 + 12, 1, (3, 4), need_grid=True).grid == (3, 4)
    assert infer_layout(1 + 64, 1, (3, 4), need_grid=True).grid == (8, 8)  # other resolution, square grid
    assert infer_layout(7, 0, None, need_grid=False).grid is None
    with pytest.raises(ValueError, match="patch_grid"):
        infer_layout(7, 0, None, need_grid=True)
    with pytest.raises(ValueError, match="num_prefix_tokens"):
        infer_layout(1, 2, None, need_grid=False)

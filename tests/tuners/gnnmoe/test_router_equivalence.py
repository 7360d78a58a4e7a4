"""The dense router against a straightforward reference: torch_geometric's sparse message-passing layers (the router's
implementation before the dense layers) on the edge list of the same graph, float64, every router and graph mode.

The reference's parameters are loaded into the dense router through its checkpoint upgrade (old sparse names and
shapes), so these tests also pin that adapters saved with the sparse router keep their meaning."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch_geometric.nn import GATConv, GCNConv, SAGEConv

from peft_gnnmoe.tuners.gnnmoe.graph import TokenLayout, build_token_graph
from peft_gnnmoe.tuners.gnnmoe.router import GraphRouter, LayoutSpec

GRAPH_MODES = ["knn", "grid", "knn+grid", "grid8", "knn+grid8", "radius", "full"]
# (batch, prefix tokens, grid, prefix mode, padded, router layers)
SHAPES = [
    (2, 1, (4, 4), "connect", False, 1),
    (3, 1, (3, 3), "isolated", True, 2),
    (2, 0, (3, 4), "connect", True, 1),
    (1, 2, (2, 3), "connect", False, 2),
]
# dense parameter name -> old sparse parameter name, per router (shapes may differ: GAT's attention vectors)
DENSE_TO_SPARSE = {
    "gcn": {"lin.weight": "lin.weight", "bias": "bias"},
    "gat": {"lin.weight": "lin.weight", "bias": "bias", "att_src": "att_src", "att_dst": "att_dst"},
    "sage": {"lin_rel.weight": "lin_l.weight", "lin_root.bias": "lin_l.bias", "lin_root.weight": "lin_r.weight"},
}
HEADS, HIDDEN, EXPERTS, TOP_K = 2, 8, 4, 2


def _sparse_conv(kind, a, b):
    if kind == "gcn":
        return GCNConv(a, b)
    if kind == "gat":
        return GATConv(a, b // HEADS, heads=HEADS, concat=True)
    return SAGEConv(a, b)


class SparseReference(nn.Module):
    """The router as it was: sparse torch_geometric layers on one graph of B * S nodes, then softmax top-k."""

    def __init__(self, kind, dim, layers):
        super().__init__()
        widths = [dim] + [HIDDEN] * layers
        self.convs = nn.ModuleList(_sparse_conv(kind, a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.head = nn.Linear(HIDDEN, EXPERTS)

    def forward(self, tokens, edge_index, valid):
        batch, seq, dim = tokens.shape
        h = tokens.reshape(batch * seq, dim)
        for i, conv in enumerate(self.convs):
            h = conv(F.gelu(h) if i > 0 else h, edge_index)
        logits = self.head(F.gelu(h)).view(batch, seq, EXPERTS)
        probs = logits.softmax(-1)
        weights, index = probs.topk(TOP_K, dim=-1)
        gates = torch.zeros_like(probs).scatter(-1, index, weights / weights.sum(-1, keepdim=True))
        weight = torch.ones(batch, seq, dtype=probs.dtype) if valid is None else valid.to(probs.dtype)
        count = weight.sum(1)
        balance = EXPERTS * ((probs * weight[..., None]).sum(1) / count[:, None]).pow(2).sum(-1)
        z_loss = (torch.logsumexp(logits, -1).pow(2) * weight).sum(1) / count
        return gates, 0.01 * balance + 1e-3 * z_loss


def _case(kind, mode, shape, seed=0):
    batch, prefix, grid, prefix_mode, padded, layers = shape
    torch.manual_seed(seed)
    seq, dim = prefix + grid[0] * grid[1], 6
    tokens = torch.randn(batch, seq, dim, dtype=torch.float64, requires_grad=True)
    valid = None
    if padded:  # the last sample loses its last three tokens
        valid = torch.ones(batch, seq, dtype=torch.bool)
        valid[-1, -3:] = False
    reference = SparseReference(kind, dim, layers).double()
    with torch.no_grad():  # non-zero biases and attention vectors, so that every parameter matters
        for p in reference.parameters():
            p.add_(0.3 * torch.randn_like(p))
    router = GraphRouter(
        dim, EXPERTS, TOP_K, kind=kind, hidden=HIDDEN, num_layers=layers, heads=HEADS, noise_std=0.0,
        graph=mode, knn_k=3, graph_radius=1.5, prefix_mode=prefix_mode,
    ).double()  # fmt: skip
    router.layout_spec = LayoutSpec(num_prefix=prefix, grid_hint=grid, explicit_grid=True)
    router.load_state_dict(reference.state_dict())  # old (sparse) names and shapes
    edge_index = build_token_graph(tokens, TokenLayout(prefix, grid), mode, 3, prefix_mode, valid, radius=1.5)
    return tokens, valid, reference, router, edge_index


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"B{s[0]}-P{s[1]}-{s[2][0]}x{s[2][1]}-{s[3]}-pad{s[4]}")
@pytest.mark.parametrize("mode", GRAPH_MODES)
@pytest.mark.parametrize("kind", ["gcn", "gat", "sage"])
def test_dense_router_equals_sparse_message_passing(kind, mode, shape):
    tokens, valid, reference, router, edge_index = _case(kind, mode, shape)
    router.start_forward(valid)
    routing = router(tokens)
    gates, aux = reference(tokens, edge_index, valid)
    torch.testing.assert_close(routing.gates, gates, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(routing.aux_loss, aux, rtol=1e-10, atol=1e-12)
    probe = torch.randn_like(gates)
    (got_tokens,) = torch.autograd.grad((routing.gates * probe).sum() + routing.aux_loss.sum(), tokens)
    (want_tokens,) = torch.autograd.grad((gates * probe).sum() + aux.sum(), tokens)
    torch.testing.assert_close(got_tokens, want_tokens, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("kind", ["gcn", "gat", "sage"])
def test_dense_router_parameter_gradients_equal_the_sparse_reference(kind):
    tokens, valid, reference, router, edge_index = _case(kind, "knn+grid", SHAPES[1], seed=1)
    router.start_forward(valid)
    routing = router(tokens)
    gates, aux = reference(tokens, edge_index, valid)
    probe = torch.randn_like(gates)
    ((routing.gates * probe).sum() + routing.aux_loss.sum()).backward()
    ((gates * probe).sum() + aux.sum()).backward()
    torch.testing.assert_close(router.head.weight.grad, reference.head.weight.grad, rtol=1e-9, atol=1e-12)
    for dense_conv, sparse_conv in zip(router.convs, reference.convs):
        sparse = dict(sparse_conv.named_parameters())
        for name, param in dense_conv.named_parameters():
            want = sparse[DENSE_TO_SPARSE[kind][name]].grad
            torch.testing.assert_close(param.grad, want.reshape(param.shape), rtol=1e-9, atol=1e-12)


def test_linear_router_is_a_per_token_mlp():
    torch.manual_seed(0)
    router = GraphRouter(6, EXPERTS, TOP_K, kind="linear", hidden=HIDDEN, num_layers=2, noise_std=0.0).double()
    router.layout_spec = LayoutSpec(num_prefix=1, grid_hint=(3, 3))
    tokens = torch.randn(2, 10, 6, dtype=torch.float64)
    first, second = router.convs
    logits = router.head(F.gelu(second(F.gelu(first(tokens)))))
    probs = logits.softmax(-1)
    weights, index = probs.topk(TOP_K, dim=-1)
    gates = torch.zeros_like(probs).scatter(-1, index, weights / weights.sum(-1, keepdim=True))
    torch.testing.assert_close(router(tokens).gates, gates, rtol=1e-12, atol=1e-12)


def test_linear_router_gates_of_a_token_ignore_the_other_tokens():
    torch.manual_seed(0)
    router = GraphRouter(6, EXPERTS, TOP_K, kind="linear", hidden=HIDDEN, noise_std=0.0).double()
    tokens = torch.randn(1, 10, 6, dtype=torch.float64)
    changed = tokens.clone()
    changed[:, 1:] = torch.randn(1, 9, 6, dtype=torch.float64)
    before = router(tokens).gates[:, 0]
    router.clear()
    torch.testing.assert_close(router(changed).gates[:, 0], before, rtol=0, atol=0)
    assert [type(m) for m in router.convs] == [nn.Linear]

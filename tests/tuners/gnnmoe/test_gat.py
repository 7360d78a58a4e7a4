"""The GAT router's lean convolution gives torch_geometric's DenseGATConv outputs and gradients (float64), and its
attention keeps what its links need, not what every token pair would."""

import pytest
import torch
from torch_geometric.nn.dense import DenseGATConv

from peft_gnnmoe.tuners.gnnmoe.gat import LeanDenseGATConv, graph_attention


def _pair(in_features=12, channels=5, heads=3, seed=0):
    torch.manual_seed(seed)
    lean = LeanDenseGATConv(in_features, channels, heads=heads, concat=True).double()
    with torch.no_grad():
        lean.bias.normal_()  # zero at init: make it count
    reference = DenseGATConv(in_features, channels, heads=heads, concat=True).double()
    reference.load_state_dict(lean.state_dict())
    return lean, reference


def _graph(batch=2, nodes=9, seed=1):
    generator = torch.Generator().manual_seed(seed)
    adj = (torch.rand(batch, nodes, nodes, generator=generator) < 0.4).double()
    adj[1, -2:] = 0  # nodes without neighbours (padding): only their self-loop
    adj[1, :, -2:] = 0
    x = torch.randn(batch, nodes, 12, dtype=torch.float64, generator=generator)
    return x, adj


def test_outputs_and_gradients_are_dense_gat_convs():
    lean, reference = _pair()
    x, adj = _graph()
    upstream = torch.randn(2, 9, 15, dtype=torch.float64)
    outs = []
    for conv in (lean, reference):
        xi = x.clone().requires_grad_()
        out = conv(xi, adj)
        grads = torch.autograd.grad((out * upstream).sum(), [xi, *conv.parameters()])
        outs.append((out, grads))
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=1e-10, atol=1e-12)
    for got, want in zip(outs[0][1], outs[1][1]):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


def test_the_attention_function_passes_gradcheck():
    generator = torch.Generator().manual_seed(2)
    src, dst = (torch.randn(1, 2, 5, dtype=torch.float64, generator=generator).requires_grad_() for _ in range(2))
    values = torch.randn(1, 2, 5, 3, dtype=torch.float64, generator=generator).requires_grad_()
    adj = torch.rand(1, 5, 5, generator=generator) < 0.5
    assert torch.autograd.gradcheck(lambda s, d, v: graph_attention(s, d, v, adj, 0.2), (src, dst, values))
    torch.library.opcheck(graph_attention, (src, dst, values, adj, 0.2))  # schema, fake tensor, autograd


def test_one_graph_for_the_whole_batch():
    lean, reference = _pair()
    x, adj = _graph()
    want = reference(x, adj[:1])  # one (1, N, N) graph for both samples
    torch.testing.assert_close(lean(x, adj[:1]), want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(lean(x, adj[0]), want, rtol=1e-10, atol=1e-12)


def test_backward_keeps_per_node_floats_not_every_token_pair():
    batch, heads, nodes, channels = 2, 4, 200, 8
    ring = torch.zeros(nodes, nodes, dtype=torch.bool)
    ring[torch.arange(nodes), (torch.arange(nodes) + 1) % nodes] = True  # 3 links per node with the self-loop
    adj = (ring | ring.T).expand(batch, -1, -1)
    src, dst = (torch.randn(batch, heads, nodes, requires_grad=True) for _ in range(2))
    values = torch.randn(batch, heads, nodes, channels, requires_grad=True)
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        graph_attention(src, dst, values, adj, 0.2)
    floats = sum(t.numel() for t in kept if t.is_floating_point())  # besides the caller's bool graph
    assert floats <= batch * nodes * (2 * heads + 2 * heads * channels)  # src, dst, values, out
    assert not any(t.is_floating_point() and t.numel() >= batch * nodes * nodes for t in kept)


def test_same_state_dict_as_dense_gat_conv():
    lean, reference = _pair()
    assert lean.state_dict().keys() == reference.state_dict().keys()


@pytest.mark.parametrize("dtype", [torch.bfloat16])
def test_runs_under_autocast(dtype):
    lean, _ = _pair()
    lean = lean.float()
    x, adj = _graph()
    x = x.float().requires_grad_()
    want = lean(x, adj.float())
    with torch.autocast("cpu", dtype=dtype):
        out = lean(x, adj.float())
    out.float().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    torch.testing.assert_close(out.float(), want, rtol=0.05, atol=0.05)


def test_flop_counter_sees_the_attention_matmul():
    from torch.utils.flop_counter import FlopCounterMode

    batch, heads, nodes, channels = 2, 3, 7, 5
    src, dst = torch.randn(batch, heads, nodes), torch.randn(batch, heads, nodes)
    values = torch.randn(batch, heads, nodes, channels)
    adj = torch.rand(batch, nodes, nodes) < 0.3
    with FlopCounterMode(display=False) as counter:
        graph_attention(src, dst, values, adj, 0.2)
    assert counter.get_total_flops() == 2 * batch * heads * nodes * nodes * channels

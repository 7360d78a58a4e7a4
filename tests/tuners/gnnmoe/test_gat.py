"""The GAT router's lean convolution gives torch_geometric's DenseGATConv outputs and gradients (float64)."""

import pytest
import torch
from torch_geometric.nn.dense import DenseGATConv

from peft_gnnmoe.tuners.gnnmoe.gat import GraphAttention, LeanDenseGATConv


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
    adj = (torch.rand(1, 1, 5, 5, generator=generator) < 0.5) | torch.eye(5, dtype=torch.bool)
    assert torch.autograd.gradcheck(lambda s, d, v: GraphAttention.apply(s, d, v, adj, 0.2), (src, dst, values))


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

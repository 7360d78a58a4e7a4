"""The SAGE router's lean convolution gives torch_geometric's DenseSAGEConv outputs and gradients (float64)."""

import pytest
import torch
from torch_geometric.nn.dense import DenseSAGEConv

from peft_gnnmoe.tuners.gnnmoe.sage import LeanDenseSAGEConv


@pytest.mark.parametrize("in_features,out_features", [(24, 5), (5, 24)])  # aggregated after / before projecting
@pytest.mark.parametrize("normalize,masked", [(False, False), (True, True)])
def test_outputs_and_gradients_are_dense_sage_convs(in_features, out_features, normalize, masked):
    torch.manual_seed(0)
    lean = LeanDenseSAGEConv(in_features, out_features, normalize=normalize).double()
    reference = DenseSAGEConv(in_features, out_features, normalize=normalize).double()
    reference.load_state_dict(lean.state_dict())
    adj = (torch.rand(2, 9, 9) < 0.4).double()
    adj[1, -2:] = 0  # nodes without neighbours
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1, -2:] = False
    x = torch.randn(2, 9, in_features, dtype=torch.float64)
    upstream = torch.randn(2, 9, out_features, dtype=torch.float64)
    results = []
    for conv in (lean, reference):
        xi = x.clone().requires_grad_()
        out = conv(xi, adj, mask if masked else None)
        results.append((out, torch.autograd.grad((out * upstream).sum(), [xi, *conv.parameters()])))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-10, atol=1e-12)
    for got, want in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)

"""The SAGE router's convolution, aggregating the projected features instead of the input's.

torch_geometric's ``DenseSAGEConv`` computes ``lin_rel(mean_j x_j) + lin_root(x_i)``: the neighbours' mean at the
input's width (1,536 features at a ViT-S fc2 layer) before projecting to the router's 64. ``lin_rel`` has no bias, so
``lin_rel(mean_j x_j) = mean_j lin_rel(x_j)``: projecting first gives the same output with the aggregation at the
router's width, in ``in / hidden`` times fewer multiply-adds and without the input-wide aggregate; the two
projections run as one matmul.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch_geometric.nn.dense import DenseSAGEConv


class LeanDenseSAGEConv(DenseSAGEConv):
    """``DenseSAGEConv`` (same parameters, state dict and outputs) that aggregates after ``lin_rel`` where that is
    the narrower side."""

    def forward(self, x: torch.Tensor, adj: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.out_channels >= self.in_channels:
            return super().forward(x, adj, mask)
        x = x.unsqueeze(0) if x.dim() == 2 else x
        adj = adj.unsqueeze(0) if adj.dim() == 2 else adj
        batch, nodes, _ = adj.shape
        # both projections in one matmul: one product, and one gradient of the input's size in the backward pass
        both = F.linear(x, torch.cat([self.lin_rel.weight, self.lin_root.weight]))
        relative, root = both.split(self.out_channels, dim=-1)
        out = torch.matmul(adj, relative) / adj.sum(dim=-1, keepdim=True).clamp(min=1) + root
        if self.lin_root.bias is not None:
            out = out + self.lin_root.bias
        if self.normalize:
            out = F.normalize(out, p=2.0, dim=-1)
        if mask is not None:
            out = out * mask.view(batch, nodes, 1).to(x.dtype)
        return out

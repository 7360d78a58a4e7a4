"""The GAT router's convolution without (B, heads, N, N) tensors kept for the backward pass.

torch_geometric's ``DenseGATConv`` computes its attention coefficients with autograd on (B, N, N, heads) tensors and
keeps two or three of them per layer until the backward pass (on the ViT-S/16 shape, 16 routers: about 200 MB, the
GAT router's whole memory excess over GCN). ``GraphAttention`` computes the same coefficients and their gradients
itself and keeps only the per-node scores, the values and the adjacency: the coefficients are recomputed in the
backward pass, a few elementwise passes. ``LeanDenseGATConv`` is ``DenseGATConv`` (same parameters, same state dict)
with its attention through it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch_geometric.nn.dense import DenseGATConv


def _coefficients(src: torch.Tensor, dst: torch.Tensor, adj: torch.Tensor, slope: float):
    """``softmax_j leaky_relu(dst_i + src_j)`` over the neighbours ``j`` of ``i`` (B, H, N, N), and the scores."""
    scores = dst.unsqueeze(-1) + src.unsqueeze(-2)  # b, h, i, j
    probs = F.leaky_relu(scores, slope).masked_fill(~adj, float("-inf")).softmax(dim=-1)
    return probs, scores


class GraphAttention(torch.autograd.Function):
    """``out[b, h, i] = sum_j P[b, h, i, j] values[b, h, j]`` with ``P`` as in ``_coefficients``; every node needs a
    neighbour (a self-loop). Saves no (B, H, N, N) tensor for the backward pass."""

    @staticmethod
    def forward(ctx, src, dst, values, adj, slope: float):  # src, dst: (B, H, N); values (B, H, N, C); adj bool
        probs, _ = _coefficients(src, dst, adj, slope)
        ctx.save_for_backward(src, dst, values, adj)
        ctx.slope = slope
        return probs.to(values.dtype) @ values

    @staticmethod
    def backward(ctx, grad_out):
        src, dst, values, adj = ctx.saved_tensors
        probs, scores = _coefficients(src, dst, adj, ctx.slope)
        grad_out = grad_out.to(values.dtype)
        grad_values = probs.to(values.dtype).transpose(-1, -2) @ grad_out
        grad_probs = (grad_out @ values.transpose(-1, -2)).to(probs.dtype)
        grad_scores = probs * (grad_probs - (grad_probs * probs).sum(-1, keepdim=True))  # softmax; zero off the graph
        grad_scores = torch.where(scores > 0, grad_scores, grad_scores * ctx.slope)  # leaky ReLU
        return grad_scores.sum(-2).to(src.dtype), grad_scores.sum(-1).to(dst.dtype), grad_values, None, None


class LeanDenseGATConv(DenseGATConv):
    """``DenseGATConv`` (concatenated heads, self-loops added, no attention dropout) whose attention keeps no
    (B, N, N, heads) tensor for the backward pass; same parameters and outputs."""

    def forward(self, x: torch.Tensor, adj: torch.Tensor, mask: torch.Tensor | None = None, add_loop: bool = True):
        if mask is not None or not add_loop or not self.concat or self.dropout > 0:
            return super().forward(x, adj, mask, add_loop)
        x = x.unsqueeze(0) if x.dim() == 2 else x
        adj = adj.unsqueeze(0) if adj.dim() == 2 else adj
        batch, nodes, _ = x.shape
        heads, channels = self.heads, self.out_channels
        h = self.lin(x).view(batch, nodes, heads, channels)
        src = (h * self.att_src).sum(-1).transpose(1, 2)  # b, h, n
        dst = (h * self.att_dst).sum(-1).transpose(1, 2)
        linked = (adj != 0) | torch.eye(nodes, dtype=torch.bool, device=adj.device)
        out = GraphAttention.apply(src, dst, h.transpose(1, 2), linked.unsqueeze(1), self.negative_slope)
        out = out.transpose(1, 2).reshape(batch, nodes, heads * channels)
        return out + self.bias if self.bias is not None else out

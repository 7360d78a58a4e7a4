"""The GAT router's convolution without (B, heads, N, N) tensors kept for the backward pass.

torch_geometric's ``DenseGATConv`` computes its attention coefficients with autograd on (B, N, N, heads) tensors and
keeps two or three of them per layer until the backward pass (on the ViT-S/16 shape, 16 routers: about 200 MB, the
GAT router's whole memory excess over GCN). ``GraphAttention`` computes the same coefficients and their gradients
itself, one head at a time, and keeps only the per-node scores, the values, the output and the adjacency: the
coefficients are recomputed in the backward pass, a few elementwise passes. ``LeanDenseGATConv`` is
``DenseGATConv`` (same parameters, same state dict) with its attention through it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch_geometric.nn.dense import DenseGATConv


def _coefficients(src: torch.Tensor, dst: torch.Tensor, adj: torch.Tensor, slope: float):
    """``softmax_j leaky_relu(dst_i + src_j)`` over the neighbours ``j`` of ``i`` (B, H, N, N), and where the scores
    ``dst_i + src_j`` are positive (bool). One float (B, H, N, N) tensor at a time besides the result."""
    scores = dst.unsqueeze(-1) + src.unsqueeze(-2)  # b, h, i, j
    positive = scores > 0
    scores = F.leaky_relu(scores, slope, inplace=True).masked_fill_(~adj, float("-inf"))
    return scores.softmax(dim=-1), positive


def _attend(src, dst, values, adj, slope: float) -> torch.Tensor:
    probs, _ = _coefficients(src, dst, adj, slope)
    return probs.to(values.dtype) @ values


def _attend_backward(src, dst, values, adj, out, grad_out, slope: float):
    """Gradients of ``_attend`` with respect to ``src``, ``dst`` and ``values``; ``out`` is its output."""
    probs, positive = _coefficients(src, dst, adj, slope)
    grad_out = grad_out.to(values.dtype)
    grad_values = probs.to(values.dtype).transpose(-1, -2) @ grad_out
    grad = (grad_out @ values.transpose(-1, -2)).to(probs.dtype)  # G = d out / d P
    # softmax: P (G - sum_j G_ij P_ij), the sum being grad_out_i . out_i; zero off the graph
    grad.sub_((grad_out.to(probs.dtype) * out.to(probs.dtype)).sum(-1, keepdim=True)).mul_(probs)
    del probs
    grad.mul_(positive.to(grad.dtype).mul_(1 - slope).add_(slope))  # leaky ReLU: 1 or the slope
    return grad.sum(-2).to(src.dtype), grad.sum(-1).to(dst.dtype), grad_values


class GraphAttention(torch.autograd.Function):
    """``out[b, h, i] = sum_j P[b, h, i, j] values[b, h, j]`` with ``P`` as in ``_coefficients``; every node needs a
    neighbour (a self-loop). Saves no (B, H, N, N) tensor for the backward pass, and works one head at a time: two
    float (B, N, N) tensors (and a bool one) at a time."""

    @staticmethod
    def forward(ctx, src, dst, values, adj, slope: float):  # src, dst: (B, H, N); values (B, H, N, C); adj bool
        heads = zip(src.split(1, 1), dst.split(1, 1), values.split(1, 1))
        out = torch.cat([_attend(s, d, v, adj, slope) for s, d, v in heads], dim=1)
        ctx.save_for_backward(src, dst, values, adj, out)
        ctx.slope = slope
        return out

    @staticmethod
    def backward(ctx, grad_out):
        src, dst, values, adj, out = ctx.saved_tensors
        heads = zip(src.split(1, 1), dst.split(1, 1), values.split(1, 1), out.split(1, 1), grad_out.split(1, 1))
        grads = [_attend_backward(s, d, v, adj, o, g, ctx.slope) for s, d, v, o, g in heads]
        grad_src, grad_dst, grad_values = (torch.cat(parts, dim=1) for parts in zip(*grads))
        return grad_src, grad_dst, grad_values, None, None


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
        # b, h, n; contiguous, so that the (b, h, n, n) scores are too (softmax would copy them)
        src = (h * self.att_src).sum(-1).transpose(1, 2).contiguous()
        dst = (h * self.att_dst).sum(-1).transpose(1, 2).contiguous()
        linked = (adj != 0) | torch.eye(nodes, dtype=torch.bool, device=adj.device)
        out = GraphAttention.apply(src, dst, h.transpose(1, 2), linked.unsqueeze(1), self.negative_slope)
        out = out.transpose(1, 2).reshape(batch, nodes, heads * channels)
        return out + self.bias if self.bias is not None else out

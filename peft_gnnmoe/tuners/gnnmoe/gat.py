"""The GAT router's convolution: attention over the graph's links only, nothing (B, heads, N, N) kept for backward.

torch_geometric's ``DenseGATConv`` computes its attention coefficients with autograd on (B, N, N, heads) tensors: a
dozen elementwise passes over every token pair, and two or three of those tensors kept per layer until the backward
pass. The token graphs are sparse (kNN 8 + grid 4: about 15 links per node with the self-loop, against 197 tokens on
ViT-S/16), so ``graph_attention`` computes the coefficients and their gradients on the links alone, (E, heads), with
segment reductions over each node's links for the softmax. Only the products with the values stay dense: one head at
a time, the coefficients are scattered into a (B, N, N) matrix that lives for one batched matmul. It keeps the
per-node scores, the values, the output and the bool graph for the backward pass, which finds the links and the
coefficients again. ``LeanDenseGATConv`` is ``DenseGATConv`` (same parameters, same state dict) with its attention
through it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import register_flop_formula
from torch_geometric.nn.dense import DenseGATConv


def graph_links(adj: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The links ``i -> j`` (node ``i`` attends to node ``j``) of the graphs ``adj`` (B, N, N; nonzero = linked) with
    self-loops added, sorted by ``i``: their rows ``b*N + i``, columns ``b*N + j`` and offsets ``b*N*N + i*N + j`` into
    the adjacency, int64 (E,) each, and the links of every node (B*N,): the segments of the softmax, none empty."""
    nodes = adj.shape[-1]
    linked = adj.to(torch.bool, copy=True)  # contiguous (also from an expanded adj), and the self-loops go in
    linked.diagonal(dim1=-2, dim2=-1).fill_(True)
    batch, i, j = linked.nonzero().unbind(1)
    first = batch * nodes
    rows = first + i
    return rows, first + j, rows * nodes + j, torch.bincount(rows, minlength=linked.shape[0] * nodes)


def _coefficients(src, dst, rows, cols, counts, slope: float):
    """``softmax_j leaky_relu(dst_i + src_j)`` over the links ``i -> j`` at ``rows``, ``cols`` (E, H, float32 or
    wider; ``counts`` links per node), and where the scores ``dst_i + src_j`` are positive (bool)."""
    batch, heads, nodes = src.shape
    dtype = torch.promote_types(src.dtype, torch.float32)
    dst_n, src_n = (t.to(dtype).transpose(1, 2).reshape(batch * nodes, heads) for t in (dst, src))
    scores = dst_n.index_select(0, rows).add_(src_n.index_select(0, cols))
    positive = scores > 0
    scores = F.leaky_relu(scores, slope, inplace=True)
    top = torch.segment_reduce(scores, "max", lengths=counts, axis=0)
    probs = scores.sub_(top.index_select(0, rows)).exp_()
    probs.div_(torch.segment_reduce(probs, "sum", lengths=counts, axis=0).index_select(0, rows))
    return probs, positive


def _attention_matrix(probs: torch.Tensor, offsets: torch.Tensor, shape: torch.Size, dtype: torch.dtype):
    """One head's (B, N, N) attention matrix: the coefficients ``probs`` (E,) at the links' ``offsets``, zero
    elsewhere."""
    matrix = torch.zeros(shape, dtype=dtype, device=probs.device)
    return matrix.view(-1).index_copy_(0, offsets, probs.to(dtype)).view(shape)


@torch.library.custom_op("peft_gnnmoe::graph_attention", mutates_args=())
def graph_attention(
    src: torch.Tensor, dst: torch.Tensor, values: torch.Tensor, adj: torch.Tensor, slope: float
) -> torch.Tensor:
    """``out[b, h, i] = sum_j P[b, h, i, j] values[b, h, j]`` with ``P`` the softmax over the links ``i -> j`` of the
    graphs ``adj`` (B, N, N bool; self-loops added) of ``leaky_relu(dst[b, h, i] + src[b, h, j])``; ``src``, ``dst``
    (B, H, N), ``values`` (B, H, N, C). Saves no (B, H, N, N) tensor for the backward pass, and builds one head's
    (B, N, N) attention matrix at a time.

    An operator of its own (not an autograd.Function), so that torch.compile sees one call: finding the links has a
    data-dependent size."""
    batch, heads, nodes = src.shape
    rows, cols, offsets, counts = graph_links(adj)
    probs = _coefficients(src, dst, rows, cols, counts, slope)[0].t().contiguous()  # H, E
    shape = (batch, nodes, nodes)
    outs = [_attention_matrix(probs[h], offsets, shape, values.dtype) @ values[:, h] for h in range(heads)]
    return torch.stack(outs, dim=1)


@graph_attention.register_fake
def _(src, dst, values, adj, slope):
    return torch.empty(values.shape, dtype=values.dtype, device=values.device)


@register_flop_formula(torch.ops.peft_gnnmoe.graph_attention)
def _graph_attention_flops(src_shape, dst_shape, values_shape, adj_shape, slope, *, out_shape=None, **kwargs) -> int:
    """FLOPs as computed: the (dense) attention matrices times the values; the coefficients are elementwise work,
    which FlopCounterMode does not count for any operator."""
    batch, heads, nodes, channels = values_shape
    return 2 * batch * heads * nodes * nodes * channels


def _save_for_backward(ctx, inputs, output) -> None:
    src, dst, values, adj, slope = inputs
    ctx.save_for_backward(src, dst, values, adj, output)
    ctx.slope = slope


def _graph_attention_backward(ctx, grad_out):
    src, dst, values, adj, out = ctx.saved_tensors
    batch, heads, nodes = src.shape
    rows, cols, offsets, counts = graph_links(adj)
    probs, positive = _coefficients(src, dst, rows, cols, counts, ctx.slope)
    grad_out = grad_out.to(values.dtype)
    shape = (batch, nodes, nodes)
    grad_values, grad = [], []
    for h, probs_h in enumerate(probs.t().contiguous()):  # one (B, N, N) matrix at a time
        grad_values.append(_attention_matrix(probs_h, offsets, shape, values.dtype).transpose(1, 2) @ grad_out[:, h])
        grad.append((grad_out[:, h] @ values[:, h].transpose(1, 2)).view(-1).index_select(0, offsets))  # d out / d P
    grad = torch.stack(grad, dim=1).to(probs.dtype)  # E, H: on the links only
    # softmax: P (G - sum_j G_ij P_ij), the sum being grad_out_i . out_i
    row_sums = (grad_out * out.to(grad_out.dtype)).sum(-1).transpose(1, 2).reshape(batch * nodes, heads)
    grad = grad.sub_(row_sums.to(probs.dtype).index_select(0, rows)).mul_(probs)
    grad.mul_(positive.to(grad.dtype).mul_(1 - ctx.slope).add_(ctx.slope))  # leaky ReLU: 1 or the slope
    grad_dst = torch.segment_reduce(grad, "sum", lengths=counts, axis=0)
    grad_src = torch.zeros_like(grad_dst).index_add_(0, cols, grad)

    def per_head(grad_nodes: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return grad_nodes.view(batch, nodes, heads).transpose(1, 2).to(like.dtype)

    return per_head(grad_src, src), per_head(grad_dst, dst), torch.stack(grad_values, dim=1), None, None


graph_attention.register_autograd(_graph_attention_backward, setup_context=_save_for_backward)


class LeanDenseGATConv(DenseGATConv):
    """``DenseGATConv`` (concatenated heads, self-loops added, no attention dropout) whose attention runs over the
    graph's links only and keeps no (B, N, N, heads) tensor for the backward pass; same parameters and outputs."""

    def forward(self, x: torch.Tensor, adj: torch.Tensor, mask: torch.Tensor | None = None, add_loop: bool = True):
        if mask is not None or not add_loop or not self.concat or self.dropout > 0:
            return super().forward(x, adj, mask, add_loop)
        x = x.unsqueeze(0) if x.dim() == 2 else x
        batch, nodes, _ = x.shape
        heads, channels = self.heads, self.out_channels
        h = self.lin(x).view(batch, nodes, heads, channels)
        src = (h * self.att_src).sum(-1).transpose(1, 2)  # b, h, n
        dst = (h * self.att_dst).sum(-1).transpose(1, 2)
        linked = adj if adj.dtype == torch.bool else adj != 0
        linked = linked.expand(batch, nodes, nodes)  # (N, N) or (1, N, N): one graph for the whole batch
        out = graph_attention(src, dst, h.transpose(1, 2), linked, self.negative_slope)
        out = out.transpose(1, 2).reshape(batch, nodes, heads * channels)
        return out + self.bias if self.bias is not None else out

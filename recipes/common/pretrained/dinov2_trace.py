"""Trace a DINOv2 ViT exported to ONNX: find every weight's role (and the model's hyper-parameters) from the graph's
edges, never from initializer order. The result names, for each transformers ``Dinov2Model`` state-dict key, the ONNX
initializers it comes from."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from .onnx_graph import GraphMismatch, LayerNormMatch, LinearMatch, OnnxGraph

_CASTS = frozenset({"Cast", "Identity"})
_TOKEN_OPS = frozenset({"Reshape", "Transpose", "Flatten"})
_POS_OPS = frozenset({"Reshape", "Transpose", "Cast", "Resize"})
_HEAD_OPS = frozenset({"Reshape", "Transpose", "Mul", "Div", "Cast"})
# What transformers' Dinov2 interpolation (F.interpolate bicubic, align_corners=False) is in ONNX terms.
_TORCH_BICUBIC = {"mode": "cubic", "coordinate_transformation_mode": "half_pixel", "cubic_coeff_a": -0.75}
_HF_ROLE_IN_NODE_NAME = {
    "attention.attention.query": "attention/attention/query/",
    "attention.attention.key": "attention/attention/key/",
    "attention.attention.value": "attention/attention/value/",
    "attention.output.dense": "attention/output/dense/",
    "mlp.fc1": "mlp/fc1/",
    "mlp.fc2": "mlp/fc2/",
}


@dataclass(frozen=True)
class Source:
    """Where one state-dict tensor comes from: ONNX initializers and how to combine them."""

    names: tuple[str, ...]
    kind: str = "copy"  # "copy", "linear" (MatMul [in, out] -> Linear [out, in]) or "concat1" (along axis 1)


@dataclass
class Dinov2Trace:
    sources: dict[str, Source] = field(default_factory=dict)
    config: dict = field(default_factory=dict)
    last_hidden_state: str = ""
    resize: dict = field(default_factory=dict)
    node_name_checks: int = 0  # independent confirmations by the exporter's node / initializer names

    def add(self, key: str, *names: str, kind: str = "copy") -> None:
        if key in self.sources:
            raise GraphMismatch(f"two graph locations map to {key!r}")
        self.sources[key] = Source(tuple(names), kind)


def trace_dinov2(graph: OnnxGraph) -> Dinov2Trace:
    """Trace the DINOv2 backbone in ``graph`` from its pixel input to the final LayerNorm.

    Raises:
        GraphMismatch: the graph is not a DINOv2 ViT of the supported form, or a backbone initializer would be used
            twice or not at all.
    """
    trace = Dinov2Trace()
    residual = _trace_embeddings(graph, trace)
    index = 0
    while True:
        norm = graph.layer_norm(residual)
        if norm is None:
            raise GraphMismatch(f"the residual stream {residual!r} ends without a final LayerNorm")
        if len(graph.weight_matmuls(norm.output)) != 3:
            break
        residual = _trace_block(graph, trace, residual, norm, index)
        index += 1
    if index == 0:
        raise GraphMismatch("no transformer block found after the embeddings")
    _add_norm(trace, "layernorm", norm)
    trace.last_hidden_state = norm.output
    trace.config["num_hidden_layers"] = index
    _check_names(graph, trace)
    _check_every_initializer_used_once(graph, trace)
    return trace


# ---- embeddings ----------------------------------------------------------------------------------------------------


def _trace_embeddings(graph: OnnxGraph, trace: Dinov2Trace) -> str:
    conv = _patch_conv(graph)
    weight, bias = conv.input[1], conv.input[2]
    out_ch, in_ch, kh, kw = graph.shape(weight)
    attrs = {a.name: list(a.ints) for a in conv.attribute}
    if kh != kw or attrs.get("strides") != [kh, kw] or any(attrs.get("pads", [0])):
        raise GraphMismatch(f"patch Conv {conv.name!r} should be a square, stride = kernel, unpadded convolution")
    trace.add("embeddings.patch_embeddings.projection.weight", weight)
    trace.add("embeddings.patch_embeddings.projection.bias", bias)

    cat, slot, _ = graph.walk_forward(conv.output[0], _TOKEN_OPS)
    if cat.op_type != "Concat" or slot != 1:
        raise GraphMismatch(f"patch tokens should enter a Concat after the CLS token, got {cat.op_type} at {slot}")
    expand = graph.producer.get(cat.input[0])
    if expand is None or expand.op_type != "Expand" or not graph.is_initializer(expand.input[0]):
        raise GraphMismatch("the token Concat should start with the CLS token expanded over the batch")
    cls_token = expand.input[0]
    trace.add("embeddings.cls_token", cls_token)

    add, slot, _ = graph.walk_forward(cat.output[0], frozenset())
    if add.op_type != "Add":
        raise GraphMismatch(f"the tokens should get position embeddings added, found {add.op_type} {add.name!r}")
    pos_cat = graph.producer.get(add.input[1 - slot])
    if pos_cat is None or pos_cat.op_type != "Concat" or not graph.is_initializer(pos_cat.input[0]):
        raise GraphMismatch("position embeddings should be Concat(CLS position, interpolated patch positions)")
    cls_pos = pos_cat.input[0]
    patch_pos, path = graph.walk_back(pos_cat.input[1], _POS_OPS)
    if patch_pos not in graph.initializers:
        raise GraphMismatch("the patch position embeddings should come from an initializer")
    resizes = [n for n in path if n.op_type == "Resize"]
    if len(resizes) != 1:
        raise GraphMismatch(f"expected one Resize interpolating the position embeddings, found {len(resizes)}")
    trace.resize = _check_torch_bicubic(resizes[0])
    trace.add("embeddings.position_embeddings", cls_pos, patch_pos, kind="concat1")

    hidden = graph.shape(cls_token)[-1]
    num_positions = graph.shape(patch_pos)[1]
    side = math.isqrt(num_positions)
    if side * side != num_positions or graph.shape(cls_pos) != (1, 1, hidden):
        raise GraphMismatch(f"position embeddings should be 1 + a square grid, got {graph.shape(patch_pos)}")
    trace.config.update(
        hidden_size=hidden, patch_size=kh, num_channels=in_ch, image_size=side * kh, pretrained_grid=side
    )
    if out_ch != hidden:
        raise GraphMismatch(f"patch Conv has {out_ch} channels but the CLS token has width {hidden}")
    return add.output[0]


def _patch_conv(graph: OnnxGraph):
    """The Conv reading the pixel input; the path must be casts only (normalisation happens outside the graph)."""
    found = []
    for node in graph.nodes:
        if node.op_type != "Conv":
            continue
        try:
            origin, path = graph.walk_back(node.input[0], _CASTS | {"Sub", "Div", "Mul", "Add"})
        except GraphMismatch:
            continue
        if origin in graph.input_names:
            found.append((node, path))
    if len(found) != 1:
        raise GraphMismatch(f"expected one Conv reading the graph input, found {len(found)}")
    node, path = found[0]
    arithmetic = [n.op_type for n in path if n.op_type not in _CASTS]
    if arithmetic:
        raise GraphMismatch(
            f"the graph normalises its input itself ({arithmetic}); the converter expects mean/std applied outside"
        )
    return node


def _check_torch_bicubic(resize) -> dict:
    attrs = {}
    for a in resize.attribute:
        attrs[a.name] = a.s.decode() if a.type == a.STRING else (a.f if a.type == a.FLOAT else a.i)
    for name, expected in _TORCH_BICUBIC.items():
        if attrs.get(name) != expected:
            raise GraphMismatch(f"position Resize has {name}={attrs.get(name)!r}; transformers uses {expected!r}")
    if attrs.get("exclude_outside", 0) != 0 or attrs.get("antialias", 0) != 0:
        raise GraphMismatch("position Resize uses exclude_outside/antialias, which transformers' Dinov2 does not")
    return attrs


# ---- blocks --------------------------------------------------------------------------------------------------------


def _trace_block(graph: OnnxGraph, trace: Dinov2Trace, residual: str, norm1: LayerNormMatch, i: int) -> str:
    prefix = f"encoder.layer.{i}."
    _add_norm(trace, prefix + "norm1", norm1)
    roles: dict[str, LinearMatch] = {}
    scales: dict[str, float] = {}
    heads = set()
    attend = None
    for matmul in graph.weight_matmuls(norm1.output):
        proj = graph.linear(matmul)
        node, slot, path = graph.walk_forward(proj.output, _HEAD_OPS)
        if node.op_type != "MatMul":
            raise GraphMismatch(f"projection {matmul.name!r} should feed an attention MatMul, found {node.op_type}")
        heads.update(_head_split(graph, path))
        softmax_after = [n for n in graph.data_consumers(node.output[0]) if n.op_type == "Softmax"]
        softmax_before = graph.producer.get(node.input[0])
        if softmax_after:  # the scores: query @ key^T
            role = ("query", "key")[slot]
            scales[role] = _path_scale(graph, path)
        elif softmax_before is not None and softmax_before.op_type == "Softmax" and slot == 1:
            role, attend = "value", node
        else:
            raise GraphMismatch(f"cannot tell the role of projection {matmul.name!r}")
        if role in roles:
            raise GraphMismatch(f"block {i}: two projections act as the {role}")
        roles[role] = proj
    if set(roles) != {"query", "key", "value"} or attend is None:
        raise GraphMismatch(f"block {i}: expected query, key and value projections, found {sorted(roles)}")
    if len(heads) != 1:
        raise GraphMismatch(f"block {i}: query/key/value disagree on the head split {heads}")
    (num_heads, head_dim), *_ = heads
    scale = scales["query"] * scales["key"]
    if not math.isclose(scale, head_dim**-0.5, rel_tol=1e-5):
        raise GraphMismatch(f"block {i}: attention scale {scale} is not 1/sqrt(head_dim={head_dim})")
    for role, proj in roles.items():
        _add_linear(trace, f"{prefix}attention.attention.{role}", proj)

    node, _, _ = graph.walk_forward(attend.output[0], _TOKEN_OPS)
    dense = graph.linear(node)
    _add_linear(trace, prefix + "attention.output.dense", dense)
    residual = _scaled_residual(graph, trace, prefix + "layer_scale1.lambda1", dense.output, residual)

    norm2 = graph.layer_norm(residual)
    if norm2 is None:
        raise GraphMismatch(f"block {i}: no LayerNorm before the MLP")
    _add_norm(trace, prefix + "norm2", norm2)
    (fc1_node,) = _one(graph.weight_matmuls(norm2.output), f"block {i}: MLP input projection")
    fc1 = graph.linear(fc1_node)
    (fc2_node,) = _one(graph.weight_matmuls(_exact_gelu(graph, fc1.output)), f"block {i}: MLP output projection")
    fc2 = graph.linear(fc2_node)
    _add_linear(trace, prefix + "mlp.fc1", fc1)
    _add_linear(trace, prefix + "mlp.fc2", fc2)
    residual = _scaled_residual(graph, trace, prefix + "layer_scale2.lambda1", fc2.output, residual)

    hidden = trace.config["hidden_size"]
    inner = graph.shape(fc1.weight)[1]
    block = dict(num_attention_heads=num_heads, mlp_ratio=inner // hidden, layer_norm_eps=norm1.eps)
    if num_heads * head_dim != hidden or norm2.eps != norm1.eps or inner % hidden:
        raise GraphMismatch(f"block {i}: heads x head_dim != width, two LayerNorm epsilons, or MLP width {inner}")
    for key, value in block.items():
        if trace.config.setdefault(key, value) != value:
            raise GraphMismatch(f"block {i}: {key}={value} differs from the earlier blocks' {trace.config[key]}")
    return residual


def _scaled_residual(graph: OnnxGraph, trace: Dinov2Trace, key: str, branch: str, residual: str) -> str:
    """Match ``residual + lambda * branch`` (layer scale); returns the new residual stream."""
    mul = graph.only_consumer(branch, "Mul")
    lam, _ = graph.initializer_input(mul)
    trace.add(key, lam)
    add = graph.only_consumer(mul.output[0], "Add")
    if sorted(add.input) != sorted([mul.output[0], residual]):
        raise GraphMismatch(f"{add.name!r} should add the layer-scaled branch to the residual stream")
    return add.output[0]


def _exact_gelu(graph: OnnxGraph, x: str) -> str:
    """Match ``0.5 * x * (1 + erf(x / sqrt(2)))`` (transformers' "gelu"); returns its output."""
    div = graph.only_consumer(x, "Div")
    erf = graph.only_consumer(div.output[0], "Erf")
    one = graph.only_consumer(erf.output[0], "Add")
    times_x = graph.only_consumer(one.output[0], "Mul")
    half = graph.only_consumer(times_x.output[0], "Mul")
    ok = (
        math.isclose(graph.scalar_input(div, x), math.sqrt(2.0), rel_tol=1e-6)
        and graph.scalar_input(one, erf.output[0]) == 1.0
        and x in times_x.input
        and graph.scalar_input(half, times_x.output[0]) == 0.5
    )
    if not ok:
        raise GraphMismatch(f"the MLP activation after {x!r} is not the exact (erf) GELU")
    return half.output[0]


def _head_split(graph: OnnxGraph, path) -> set[tuple[int, int]]:
    """``(heads, head_dim)`` from the Reshape on a projection's way to the attention MatMul."""
    found = set()
    for node in path:
        if node.op_type != "Reshape":
            continue
        shape = graph.producer.get(node.input[1])
        if shape is not None and shape.op_type == "Concat":
            dims = [int(graph.array(i).reshape(-1)[0]) if i in graph.constants else -1 for i in shape.input]
        else:
            dims = [int(d) for d in graph.array(node.input[1])]
        found.add((dims[-2], dims[-1]))
    return found


def _path_scale(graph: OnnxGraph, path) -> float:
    scale = 1.0
    for node in path:
        if node.op_type in {"Mul", "Div"}:
            consts = [i for i in node.input if i in graph.constants or graph.is_initializer(i)]
            (value,) = [float(np.asarray(graph.array(c)).reshape(())) for c in consts]
            scale = scale * value if node.op_type == "Mul" else scale / value
    return scale


def _one(items: list, what: str) -> list:
    if len(items) != 1:
        raise GraphMismatch(f"{what}: expected exactly one, found {len(items)}")
    return items


def _add_norm(trace: Dinov2Trace, key: str, norm: LayerNormMatch) -> None:
    trace.add(key + ".weight", norm.weight)
    trace.add(key + ".bias", norm.bias)


def _add_linear(trace: Dinov2Trace, key: str, linear: LinearMatch) -> None:
    trace.add(key + ".weight", linear.weight, kind="linear")
    trace.add(key + ".bias", linear.bias)
    role = key.split(".", 3)[-1]
    layer = key.split(".")[2]
    if linear.node_name and (
        f"layer.{layer}/" not in linear.node_name or _HF_ROLE_IN_NODE_NAME[role] not in linear.node_name
    ):
        raise GraphMismatch(f"traced {key} but the exporter named the MatMul {linear.node_name!r}")
    trace.node_name_checks += bool(linear.node_name)


# ---- checks --------------------------------------------------------------------------------------------------------


def _check_names(graph: OnnxGraph, trace: Dinov2Trace) -> None:
    """Where the exporter kept transformers' names (``backbone.<key>``), they must agree with the trace."""
    for key, source in trace.sources.items():
        for name in source.names:
            if name.startswith("backbone."):
                if name != "backbone." + key:
                    raise GraphMismatch(f"the graph trace maps {name!r} to {key!r}")
                trace.node_name_checks += 1


def _check_every_initializer_used_once(graph: OnnxGraph, trace: Dinov2Trace) -> None:
    uses = Counter(name for source in trace.sources.values() for name in source.names)
    twice = sorted(name for name, count in uses.items() if count > 1)
    backbone = graph.ancestor_initializers(trace.last_hidden_state)
    unused = sorted(backbone - set(uses))
    outside = sorted(set(uses) - backbone)
    if twice or unused or outside:
        raise GraphMismatch(f"initializers used twice {twice}, unused {unused}, outside the backbone {outside}")

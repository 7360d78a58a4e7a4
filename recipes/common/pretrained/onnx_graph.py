"""Walking an ONNX graph by its edges: which node produces / consumes a tensor, and matchers for the patterns an
exported transformer is made of (LayerNorm, Linear). Used to map unnamed ONNX weights to their real roles."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import onnx

# Ops that only compute shapes from a tensor; a data path never goes through them.
SHAPE_OPS = frozenset({"Shape"})


class GraphMismatch(ValueError):
    """The ONNX graph does not have the structure the converter expects (the converter refuses to guess)."""


@dataclass(frozen=True)
class LayerNormMatch:
    weight: str
    bias: str
    eps: float
    output: str


@dataclass(frozen=True)
class LinearMatch:
    weight: str  # ONNX MatMul weights are [in, out]
    bias: str
    output: str
    node_name: str


class OnnxGraph:
    """Read-only index of an ONNX graph: producers, consumers, initializers and constants."""

    def __init__(self, model: onnx.ModelProto):
        from onnx import numpy_helper

        self._to_array = numpy_helper.to_array
        graph = model.graph
        self.nodes = list(graph.node)
        self.initializers = {t.name: t for t in graph.initializer}
        self.input_names = [i.name for i in graph.input if i.name not in self.initializers]
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        self.constants: dict[str, np.ndarray] = {}
        for node in graph.node:
            for out in node.output:
                self.producer[out] = node
            for inp in node.input:
                if inp:
                    self.consumers[inp].append(node)
            if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
                self.constants[node.output[0]] = self._to_array(node.attribute[0].t)

    # ---- basic queries ---------------------------------------------------------------------------------------------

    def array(self, name: str) -> np.ndarray:
        """The value of an initializer or a Constant node's output."""
        if name in self.initializers:
            return self._to_array(self.initializers[name])
        if name in self.constants:
            return self.constants[name]
        raise GraphMismatch(f"{name!r} is neither an initializer nor a constant")

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.initializers[name].dims)

    def is_initializer(self, name: str) -> bool:
        return name in self.initializers

    def data_consumers(self, tensor: str) -> list[onnx.NodeProto]:
        """Consumers of ``tensor`` that use its values (shape-only consumers left out)."""
        return [n for n in self.consumers.get(tensor, []) if n.op_type not in SHAPE_OPS]

    def only_consumer(self, tensor: str, op_type: str) -> onnx.NodeProto:
        found = [n for n in self.data_consumers(tensor) if n.op_type == op_type]
        if len(found) != 1:
            raise GraphMismatch(f"expected exactly one {op_type} consuming {tensor!r}, found {len(found)}")
        return found[0]

    def initializer_input(self, node: onnx.NodeProto) -> tuple[str, str]:
        """``(initializer name, other input)`` of a binary node with exactly one initializer input."""
        inits = [i for i in node.input if i in self.initializers]
        others = [i for i in node.input if i not in self.initializers]
        if len(inits) != 1 or len(others) != 1:
            raise GraphMismatch(f"{node.op_type} {node.name!r} should have one initializer and one data input")
        return inits[0], others[0]

    def scalar_input(self, node: onnx.NodeProto, data: str) -> float:
        """The scalar constant input of a binary node whose other input is ``data``."""
        (other,) = [i for i in node.input if i != data]
        value = self.array(other)
        if value.size != 1:
            raise GraphMismatch(f"{node.op_type} {node.name!r} should have a scalar constant input")
        return float(value.reshape(()))

    def walk_forward(self, tensor: str, through: frozenset[str]) -> tuple[onnx.NodeProto, int, list[onnx.NodeProto]]:
        """Follow the single data consumer of ``tensor`` through ops in ``through``.

        Returns the first node outside ``through``, the input slot ``tensor``'s path enters it at, and the nodes
        passed on the way. Fails when the path branches (several data consumers).
        """
        path = []
        while True:
            nodes = self.data_consumers(tensor)
            if len(nodes) != 1:
                raise GraphMismatch(f"{tensor!r} should have exactly one data consumer, found {len(nodes)}")
            node = nodes[0]
            if node.op_type not in through:
                return node, list(node.input).index(tensor), path
            path.append(node)
            tensor = node.output[0]

    def walk_back(self, tensor: str, through: frozenset[str]) -> tuple[str, list[onnx.NodeProto]]:
        """Follow input 0 back through ops in ``through`` to an initializer or graph input; returns it and the path."""
        path = []
        while tensor not in self.initializers and tensor not in self.input_names:
            node = self.producer.get(tensor)
            if node is None or node.op_type not in through:
                op = node.op_type if node is not None else "nothing"
                raise GraphMismatch(f"{tensor!r} is produced by {op}, expected one of {sorted(through)}")
            path.append(node)
            tensor = node.input[0]
        return tensor, path

    def ancestor_initializers(self, tensor: str) -> set[str]:
        """Every initializer the value of ``tensor`` depends on (the sub-graph an extraction at ``tensor`` keeps)."""
        seen, stack, found = set(), [tensor], set()
        while stack:
            name = stack.pop()
            if name in seen:
                continue
            seen.add(name)
            if name in self.initializers:
                found.add(name)
            node = self.producer.get(name)
            if node is not None:
                stack.extend(i for i in node.input if i)
        return found

    # ---- pattern matchers ------------------------------------------------------------------------------------------

    def layer_norm(self, x: str) -> LayerNormMatch | None:
        """Match ``(x - mean) / sqrt(var + eps) * weight + bias`` over the last axis, starting at tensor ``x``.

        Returns None when no ReduceMean consumes ``x``; raises when the pattern starts but does not complete.
        """
        means = [n for n in self.data_consumers(x) if n.op_type == "ReduceMean"]
        if not means:
            return None
        if len(means) != 1:
            raise GraphMismatch(f"expected one ReduceMean (LayerNorm) consuming {x!r}, found {len(means)}")
        mean = means[0]
        _check_last_axis(mean)
        sub = self.only_consumer(mean.output[0], "Sub")
        if list(sub.input) != [x, mean.output[0]]:
            raise GraphMismatch(f"{sub.name!r} should compute x - mean(x)")
        power = self.only_consumer(sub.output[0], "Pow")
        if self.scalar_input(power, sub.output[0]) != 2.0:
            raise GraphMismatch(f"{power.name!r} should square the centred input")
        var = self.only_consumer(power.output[0], "ReduceMean")
        _check_last_axis(var)
        add_eps = self.only_consumer(var.output[0], "Add")
        eps = self.scalar_input(add_eps, var.output[0])
        sqrt = self.only_consumer(add_eps.output[0], "Sqrt")
        div = self.only_consumer(sqrt.output[0], "Div")
        if list(div.input) != [sub.output[0], sqrt.output[0]]:
            raise GraphMismatch(f"{div.name!r} should divide the centred input by the standard deviation")
        mul = self.only_consumer(div.output[0], "Mul")
        weight, _ = self.initializer_input(mul)
        add = self.only_consumer(mul.output[0], "Add")
        bias, _ = self.initializer_input(add)
        return LayerNormMatch(weight=weight, bias=bias, eps=eps, output=add.output[0])

    def linear(self, matmul: onnx.NodeProto) -> LinearMatch:
        """Match ``x @ W + b`` starting at a MatMul whose second input is an initializer."""
        if matmul.op_type != "MatMul" or matmul.input[1] not in self.initializers:
            raise GraphMismatch(f"{matmul.name!r} should be a MatMul by an initializer weight")
        add = self.only_consumer(matmul.output[0], "Add")
        bias, _ = self.initializer_input(add)
        return LinearMatch(weight=matmul.input[1], bias=bias, output=add.output[0], node_name=matmul.name)

    def weight_matmuls(self, tensor: str) -> list[onnx.NodeProto]:
        """MatMuls consuming ``tensor`` (as their first input) by an initializer weight."""
        return [
            n
            for n in self.data_consumers(tensor)
            if n.op_type == "MatMul" and n.input[0] == tensor and n.input[1] in self.initializers
        ]


def _check_last_axis(reduce: onnx.NodeProto) -> None:
    axes = [list(a.ints) for a in reduce.attribute if a.name == "axes"]
    if axes != [[-1]]:
        raise GraphMismatch(f"LayerNorm {reduce.name!r} should reduce over axis -1 only, got axes {axes}")

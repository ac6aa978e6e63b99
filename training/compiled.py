"""The training step's energies, forces and stress through torch.compile (``compile: true`` in a training config).

A force loss needs the gradient of a gradient, which torch.compile cannot take through its own graph.
So ``compute_properties`` is first traced with ``make_fx`` as a function of the parameters: the trace
writes the force ``autograd.grad`` out as ordinary operations (NequIP's approach). torch.compile then
fuses that graph and differentiates it once for the loss. The trace is symbolic in the numbers of
atoms, edges and structures, so one compilation serves every batch (a batch of one structure
recompiles once: torch.compile specialises sizes of 1). Its ``view`` operations become ``reshape``:
the trace picks view or copy from symbolic strides, which real tensors of other sizes need not share.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Iterator

import torch
from torch.func import functional_call
from torch.fx.experimental.proxy_tensor import make_fx

from mlip.graph import AtomicGraph
from mlip.model import MLIPModel
from mlip.properties import compute_properties

_GRAPH_TENSORS = tuple(f.name for f in dataclasses.fields(AtomicGraph) if f.name != "targets")
# the dimension of each that counts atoms, edges or structures: the sizes that change between batches
_VARYING_DIM = {"edge_index": 1}


class CompiledProperties:
    """``compute_properties(model, graph, forces=True, stress=stress, training=True)``, traced and compiled on first call.

    Gradients of the results reach ``model``'s own parameters, so the optimiser and EMA see nothing new.
    ``backend`` is torch.compile's ("inductor": generated C++/Triton kernels; "eager": the
    traced graph run op by op, which tests use to check the trace without minutes of code generation).
    """

    def __init__(self, model: MLIPModel, stress: bool, backend: str = "inductor"):
        self.model, self.stress, self.backend = model, stress, backend
        self.keys = ("energy", "energies", "forces") + (("stress",) if stress else ())
        self.names = [name for name, _ in model.named_parameters()]
        self.compiled = None

    def __call__(self, graph: AtomicGraph) -> dict[str, torch.Tensor]:
        params = list(self.model.parameters())
        tensors = [getattr(graph, name) for name in _GRAPH_TENSORS]
        for name, tensor in zip(_GRAPH_TENSORS, tensors):  # compiled for any size there; the 3s of vectors stay fixed
            torch._dynamo.maybe_mark_dynamic(tensor, _VARYING_DIM.get(name, 0))
        if self.compiled is None:
            with _distinct_symbols():
                traced = make_fx(self._properties, tracing_mode="symbolic", _allow_non_fake_inputs=True)(params, *tensors)
            _views_as_reshapes(traced)
            # kernels called from generated C++ rather than Python: ~10 % off an aspirin step on 2 CPU threads
            options = {"cpp_wrapper": True} if self.backend == "inductor" else None
            self.compiled = torch.compile(traced, backend=self.backend, options=options)
        return dict(zip(self.keys, self.compiled(params, *tensors)))

    def _properties(self, params: list[torch.Tensor], *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        weights = dict(zip(self.names, params))
        graph = AtomicGraph(**dict(zip(_GRAPH_TENSORS, tensors)))
        out = compute_properties(
            lambda *inputs: functional_call(self.model, weights, inputs), graph, forces=True, stress=self.stress,
            training=True,
        )
        return tuple(out[k] for k in self.keys)


@contextlib.contextmanager
def _distinct_symbols() -> Iterator[None]:
    """Trace every size as its own symbol: with "duck shaping" two sizes equal by chance (3 structures and the
    3 Cartesian components) would be traced as one, and the graph would be wrong for any other batch."""
    config = torch.fx.experimental._config
    previous, config.use_duck_shape = config.use_duck_shape, False
    try:
        yield
    finally:
        config.use_duck_shape = previous


def _views_as_reshapes(traced: torch.fx.GraphModule) -> None:
    """Replace every ``aten.view`` by ``aten.reshape`` (a view where strides allow, else a copy: the same values).

    Sound only while nothing is written in place through an alias, which a copy would cut: every in-place
    operation of the trace must write a fresh tensor (an ``empty_like``, an arithmetic result) used by nothing else.
    """
    for node in traced.graph.nodes:
        if not _is_op(node):
            continue
        if node.target is torch.ops.aten.view.default:
            node.target = torch.ops.aten.reshape.default
        elif node.target._schema.is_mutable:
            written = node.args[0]
            while _is_op(written) and written.target._schema.is_mutable:  # a chain of in-place ops on one tensor
                written = written.args[0]
            fresh = _is_op(written) and not any(r.alias_info for r in written.target._schema.returns)
            if not fresh or len(node.args[0].users) > 1:
                raise RuntimeError(f"the compiled training step cannot trace {node.target} writing into an alias")
    traced.recompile()


def _is_op(node: torch.fx.Node) -> bool:
    """A call of an ATen operator (not a graph input, a Python operator on sizes or the output)."""
    return node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload)

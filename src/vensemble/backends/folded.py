"""The member loop over a rewritten forward: each eval-mode BatchNorm folded into its conv.

Inference only. A ``Conv{1,2,3}d`` whose output goes only to a ``BatchNorm`` of the same
dimension becomes one convolution per member with the BatchNorm's affine map folded into its
weights, computed from the member's current tensors on every call (so training, loading and
in-place edits show through):

    s = gamma / sqrt(running_var + eps)        w' = w * s        b' = (b - running_mean) * s + beta

One pass over the activations fewer per pair, and a ReLU (Tanh, Sigmoid) after it runs in
place. On a CPU, where ``auto`` runs a convolutional ensemble member by member, the benchmark's
8-member CNN took 0.73x the plain loop's time (see BENCHMARKS.md). Where folding would not compute what the
loop computes to float rounding (autograd or autocast on, a BatchNorm in training mode or
without running statistics, a lower or mixed precision, a channel-count mismatch, an unbatched
input), the pair runs as the two layers.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import Tensor, nn

from ._call import Call
from ._layers import fold_batchnorm, foldable_batchnorm
from .fused import Afresh, Untraceable, _trace, activations_in_place, sole_input

__all__ = ["FoldedPlan", "folded_program"]

_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
_PAIRS: dict[type[nn.Module], type[nn.Module]] = {
    nn.Conv1d: nn.BatchNorm1d,
    nn.Conv2d: nn.BatchNorm2d,
    nn.Conv3d: nn.BatchNorm3d,
}


class _ConvBN:
    """``bn(conv(x))``; one convolution with ``bn`` folded in where that computes the same."""

    def __init__(self, conv: nn.Module, bn: nn.Module, name: str) -> None:
        self.conv: Any = conv  # typed loosely: a conv's and a BatchNorm's fields
        self.bn: Any = bn
        self.name = name  # "conv path -> bn path", for explain()

    def foldable(self) -> bool:
        """Whether a call now would fold (else it runs the two layers)."""
        return foldable_batchnorm(self.conv.weight, self.bn)

    def forward(self, x: Tensor) -> Tensor:
        conv, bn = self.conv, self.bn
        # an unbatched input makes the conv's output (C, *s): a BatchNorm reads its first dim
        # as the batch, not the channels, so it runs as is
        if x.ndim != conv.weight.ndim or not self.foldable():
            return bn(conv(x))
        return conv._conv_forward(x, *fold_batchnorm(conv.weight, conv.bias, bn))


def _fold(graph: fx.Graph, template: nn.Module) -> list[_ConvBN]:
    """Rewrite every conv -> BatchNorm pair in ``graph``; the pairs, in order."""
    pairs = []
    for bn_node in list(graph.nodes):
        if bn_node.op != "call_module":
            continue
        conv_node = sole_input(bn_node)
        if conv_node is None or conv_node.op != "call_module" or len(conv_node.users) != 1:
            continue
        conv = template.get_submodule(str(conv_node.target))
        bn = template.get_submodule(str(bn_node.target))
        if _PAIRS.get(type(conv)) is not type(bn) or sole_input(conv_node) is None:
            continue
        pair = _ConvBN(conv, bn, f"{conv_node.target} -> {bn_node.target}")
        with graph.inserting_before(bn_node):
            fused = graph.call_function(pair.forward, conv_node.args)
        bn_node.replace_all_uses_with(fused)
        graph.erase_node(bn_node)
        graph.erase_node(conv_node)
        pairs.append(pair)
    return pairs


@dataclass
class FoldedProgram:
    """A member's forward with its conv -> BatchNorm pairs folded; call it as the member."""

    module: fx.GraphModule
    pairs: list[_ConvBN]

    def active(self) -> bool:
        """Whether a call now folds at least one pair."""
        return any(p.foldable() for p in self.pairs)

    def describe(self) -> str:
        """What runs, for ``Ensemble.explain()``."""
        pairs = ", ".join(p.name for p in self.pairs)
        return f"each member in turn, with BatchNorm folded into the convolution before it: {pairs}"


def _build(template: nn.Module) -> FoldedProgram | str:
    constants: dict[str, Any] = {}
    params = inspect.signature(template.forward).parameters.values()
    if any(p.default is not p.empty or p.kind not in _POSITIONAL for p in params):
        # a traced default (``bias=None``) would bake its branch in; the fused path keys
        # programs on such values, this one keeps to forwards that take their tensors only
        return "the forward has optional or keyword-only arguments"
    try:
        graph = _trace(template, {}, constants)
    except Untraceable as err:
        return str(err)
    if any(node.op == "get_attr" for node in graph.nodes):
        # a GraphModule keeps its own reference to such a tensor: the loop's per-member views
        # (swapped into the template's slots) would not reach it
        return "the forward reads a tensor attribute directly"
    pairs = _fold(graph, template)
    if not pairs:
        return "no convolution followed by its BatchNorm"
    activations_in_place(graph, fresh=(_ConvBN,), root=template)
    return FoldedProgram(fx.GraphModule(template, graph, class_name="FoldedMember"), pairs)


@dataclass
class FoldedPlan(Afresh):
    """Folded programs per call signature and module training flags; a string where none
    (they refer to the template they were traced from: a copy starts afresh)."""

    programs: dict[Any, FoldedProgram | str] = field(default_factory=dict)
    last: FoldedProgram | None = None  # what the latest call got
    modules: list[nn.Module] = field(default_factory=list)  # the template's, listed once


def folded_program(call: Call, plan: FoldedPlan) -> FoldedProgram | None:
    """The folded forward for ``call``, or ``None`` where it would not fold anything now.

    Only inference calls with tensor inputs qualify; ``loop_forward(call, program.module)`` runs
    it member by member.
    """
    plan.last = None
    if torch.is_grad_enabled() or not call.tensor_args:
        return None
    if not plan.modules:
        plan.modules = list(call.template.modules())
    key = (len(call.args), tuple([m.training for m in plan.modules]))  # code may read .training
    program = plan.programs.get(key)
    if program is None:
        program = _build(call.template)
        plan.programs[key] = program
    if isinstance(program, str) or not program.active():
        return None
    plan.last = program
    return program

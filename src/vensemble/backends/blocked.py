"""Members in blocks: the fused program run on a few members at a time (CPU inference).

A batched layer over many members writes ``N x rows x width`` numbers at once: 16 MiB for
1000 x MLP 8-32-32-1 on 128 rows, more than a CPU core's caches hold, so every layer streams
its input and its output through memory (and a fresh allocation of that size costs page
faults). Run on blocks of members whose widest activation is about ``BLOCK_BYTES``, each layer
of a block reads what the last one just wrote from the cache. On the 2-core AMD EPYC sandbox
(torch 2.13, 2 threads) those 1000 members took 3.2-3.4 ms per call in blocks of 64-128
members, against 5.4-6.1 ms at once (hand-written ``baddbmm`` either way).

Each block is an ensemble of its own: a copy of the template's module tree whose tensors are
views of the stacked ones (so in-place updates show through), with its own fused program.
``auto`` measures this path against the whole-ensemble one (see ``Ensemble._choose``); it is
offered for CPU calls without autograd (a forward that autograd records keeps every
activation for the backward anyway) of members that draw no random numbers, update no
buffers and write none of their inputs in place (each block would draw, update or write on
its own), and whose every submodule has a fused layer. Blocks run eagerly, with ``compile``
set too: ``torch.compile`` of hand-written blocks of those 1000 members measured 3.5-3.8 ms
against 3.3-3.4 ms eager (the GEMMs are the same extern kernels; a compile per block program
would only multiply the warm-up).
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
import torch.fx as fx
import torch.utils._pytree as pytree
from torch import Tensor, nn

from ._call import Call, stack_outputs
from ._ops import RANDOM_FUNCTIONS, RANDOM_METHODS, Op
from .fused import (
    _RANDOM_MODULES,
    Afresh,
    FusedPlan,
    FusedProgram,
    Memo,
    _Submodule,
    contiguous_outputs,
    fused_forward,
    program_for,
)

__all__ = ["BLOCK_BYTES", "MIN_BLOCK", "BlockedPlan", "Unblockable", "blocked_forward"]

# The widest activation a block may have: within a core's L2 and the shared L3 of the CPUs
# measured. On the AMD EPYC sandbox (1 MiB L2 per core, 32 MiB L3), 1000 x MLP 8-32-32-1 at
# 128 rows (16 KiB per member at the widest) took 3.2-3.3 ms per call in blocks of 64 or 128
# members (1-2 MiB), 3.6 in blocks of 32 and 4.8 in blocks of 16 (each block's ops cost their
# dispatch again), 5.4-6.1 ms at once.
BLOCK_BYTES = 2 * 2**20
# Fewer members per block, and per-op overheads outweigh what the cache saves
MIN_BLOCK = 16


class Unblockable(Exception):
    """This call cannot run in blocks, or would gain nothing from it (the reason)."""


_STRUCTURE = ("_parameters", "_buffers", "_modules")


@dataclass
class _Blocks:
    """The members cut into blocks: per block, a template of views and its own fused plan.

    The copies mirror the template: when a tensor, a ``None`` slot or an attribute of one of
    its modules changes (``p.data = ...``, a bias given to a layer built without one,
    ``functional_call``, ``bn.eps = ...``, ``train()``), :meth:`refresh` points the copies at
    the new values. The programs read their modules' tensors and settings at each call, as the
    whole ensemble's do, so nothing is traced again. (A setting of torch's own layers may
    change what the sizing run found: see ``BlockedPlan.settings``.)"""

    bounds: list[tuple[int, int]]
    templates: list[nn.Module]
    plans: list[FusedPlan]
    # each template module with its copy in every block
    pairs: list[tuple[nn.Module, list[nn.Module]]]
    # each template module's attribute, parameter and buffer dict with the values they held
    # when the copies were last made to mirror them ...
    held: list[tuple[dict[str, Any], tuple[Any, ...]]] = field(default_factory=list)
    # ... and each stacked tensor with its data_ptr (``p.data = ...`` keeps the object)
    storage: list[tuple[Tensor, int]] = field(default_factory=list)

    def current(self) -> bool:
        """Whether the copies still mirror the template."""
        return (
            bool(self.held)
            and all(
                len(d) == len(values) and all(map(operator.is_, d.values(), values))
                for d, values in self.held
            )
            and all(t.data_ptr() == ptr for t, ptr in self.storage)
        )

    def refresh(self) -> None:
        """Make the copies mirror the template again."""
        views: list[dict[int, Tensor]] = [{} for _ in self.bounds]  # (tied tensors: one view)
        for m, copies in self.pairs:
            for c, (s, e), done in zip(copies, self.bounds, views):
                kept = c.__dict__["_modules"]
                c.__dict__.clear()
                c.__dict__.update(m.__dict__)
                c.__dict__["_parameters"] = {
                    k: _view(t, s, e, done, parameter=True) for k, t in m._parameters.items()
                }
                c.__dict__["_buffers"] = {k: _view(t, s, e, done) for k, t in m._buffers.items()}
                c.__dict__["_modules"] = kept
        self._hold()

    def _hold(self) -> None:
        modules = [m for m, _ in self.pairs]
        self.held = [
            (d, tuple(d.values())) for m in modules for d in (m.__dict__, m._parameters, m._buffers)
        ]
        self.storage = [
            (t, t.data_ptr())
            for m in modules
            for t in [*m._parameters.values(), *m._buffers.values()]
            if t is not None
        ]

    def release_views(self) -> None:
        """Let go of the template's tensors (before torch swaps them: ``swap_tensors``
        refuses a tensor something else refers to); the next call mirrors them again."""
        self.held, self.storage = [], []
        for plan in self.plans:
            plan.release_views()


def _settings_of(d: dict[str, Any]) -> Any:
    """A module's attribute values but its training flag (the programs are kept per flags)
    and its tensors and children (which ``_Blocks`` follows)."""
    return (v for k, v in d.items() if k not in ("training", *_STRUCTURE))


def _view(
    t: Tensor | None, s: int, e: int, done: dict[int, Tensor], parameter: bool = False
) -> Tensor | None:
    """Rows ``s:e`` of ``t`` (detached: blocks run without autograd), once per tensor. A
    parameter's stays an ``nn.Parameter``: fx traces a member's direct use of one
    (``x * self.temperature``) as an attribute read, of a plain tensor as a constant."""
    if t is None:
        return None
    if id(t) not in done:
        rows = t.detach()[s:e]
        done[id(t)] = nn.Parameter(rows, requires_grad=False) if parameter else rows
    return done[id(t)]


def _cut(template: nn.Module, n: int, block: int) -> _Blocks:
    """``template``'s module tree once per block of ``block`` members (the last may be
    smaller): the same modules' attributes, each stacked tensor a view of its rows. A module
    found twice in the tree is copied once."""
    bounds = [(s, min(s + block, n)) for s in range(0, n, block)]
    copies: list[dict[int, nn.Module]] = [{} for _ in bounds]

    def visit(m: nn.Module, done: dict[int, nn.Module]) -> nn.Module:
        if id(m) not in done:
            c = done[id(m)] = object.__new__(type(m))  # (refresh fills its __dict__)
            c.__dict__["_modules"] = {
                k: None if child is None else visit(child, done) for k, child in m._modules.items()
            }
        return done[id(m)]

    templates = [visit(template, done) for done in copies]
    modules = list(template.modules())
    pairs = [(m, [done[id(m)] for done in copies]) for m in modules]
    blocks = _Blocks(bounds, templates, [FusedPlan() for _ in bounds], pairs)
    blocks.refresh()
    return blocks


def _why_not(template: nn.Module, program: FusedProgram) -> str | None:
    """Why ``program`` must run on all members at once, if it must."""
    for path, m in template.named_modules():
        if any("__slots__" in vars(k) for k in type(m).__mro__[:-1]):
            return f"'{path}' has __slots__ (its blocks' copies hold its __dict__ only)"
        if m.training and isinstance(m, _RANDOM_MODULES):
            return f"'{path}' draws random numbers (training mode): each block would draw its own"
        if m.training and next(m.buffers(recurse=False), None) is not None:
            return f"'{path}' updates its buffers (training mode)"
    for name, part in program.parts.items():
        if isinstance(part, _Submodule):  # (each block would learn, and warn, anew)
            return f"'{name}' has no fused layer (it runs through {part.how})"
        target = getattr(part, "target", None)
        if isinstance(part, Op) and (target in RANDOM_FUNCTIONS or target in RANDOM_METHODS):
            return f"{name} draws random numbers: each block would draw its own"
    return None


class _Widest(fx.Interpreter):
    """Runs a program, noting the bytes of the largest tensor any step made."""

    widest = 0

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        for t in pytree.tree_leaves(out):
            if isinstance(t, Tensor) and n.op != "placeholder":
                self.widest = max(self.widest, t.numel() * t.element_size())
        return out


def _with_version(t: Tensor) -> Tensor:
    """``t``, or a plain copy of an inference tensor (call outside inference mode)."""
    return t.clone() if t.is_inference() else t


class _Seen:
    """A tensor's version counter now (its values, for an inference tensor, which has none)."""

    def __init__(self, t: Tensor) -> None:
        self.t = t
        self.version = None if t.is_inference() else t._version
        self.values = t.clone() if self.version is None else None

    def changed(self) -> bool:
        if self.values is None:
            return self.t._version != self.version
        return not torch.equal(self.t, self.values)  # (NaN: never equal, so "changed")


def _block_size(call: Call, program: FusedProgram, dynamic: list[Any]) -> int | str:
    """How many members a block holds for this call signature, or why it is not blocked:
    the program is run once (its inputs put back after) to find its widest activation."""
    reason = _why_not(call.template, program)
    if reason is not None:
        return reason
    # an inference tensor has no version counter, and a value compare misses a write that
    # leaves these values as they were (x * 2 of zeros): the run gets a plain copy of each
    with torch.inference_mode(False):
        inputs = pytree.tree_map_only(Tensor, _with_version, dynamic)
    state = [*call.template.parameters(), *call.template.buffers()]
    before = (
        [_Seen(t) for t in pytree.tree_leaves(inputs) if isinstance(t, Tensor)],
        [_Seen(t) for t in state],
        torch.get_rng_state(),
    )
    put_back_inputs, buffers = call.input_keeper(), call.snapshot_buffers()
    probe = _Widest(program.module)
    try:
        with torch.inference_mode(False), torch.no_grad():
            probe.run(*inputs)
        wrote_input = any(seen.changed() for seen in before[0])
        wrote_state = any(seen.changed() for seen in before[1])
        drew = not torch.equal(torch.get_rng_state(), before[2])
    finally:  # (the probe may run in a real call: it must leave nothing changed)
        put_back_inputs()
        call.restore_buffers(buffers)
        torch.set_rng_state(before[2])
    if wrote_input:
        return "the forward writes one of its inputs in place: each block would write it"
    if wrote_state:
        return "the forward updates a parameter or buffer in place"
    if drew:  # (a random op the lists above miss: each block would draw its own)
        return "the forward draws random numbers: each block would draw its own"
    per_member = max(probe.widest // call.n, 1)
    # a power of two: few distinct sizes over many batch sizes (each size's blocks are kept)
    block = max(MIN_BLOCK, 1 << max(BLOCK_BYTES // per_member, 1).bit_length() - 1)
    if 2 * block > call.n:
        return (
            f"the widest activation ({probe.widest / 2**20:.2g} MiB for all members) fits in "
            f"{(call.n + block - 1) // block} block"
        )
    return block


@dataclass
class BlockedPlan(Afresh):
    """The block size per call signature (or why not), and the blocks cut for each size
    (views of the template: a copy starts afresh)."""

    sizes: Memo = field(default_factory=lambda: Memo("block sizes"))
    # by block size: powers of two from MIN_BLOCK to N / 2, so at most log2(N) of them
    blocks: dict[int, _Blocks] = field(default_factory=dict)
    last: _Blocks | None = None  # the blocks of the most recent call, for explain()
    # The settings of torch's own layers when ``sizes`` was last emptied: a fused layer reads
    # them at each call, so a change (``inplace = True``) can make a sized call write its input
    # once per block. A change empties ``sizes`` and moves ``epoch`` on, which the fast path's
    # runners check.
    settings: list[tuple[dict[str, Any], int, tuple[Any, ...]]] | None = None
    epoch: int = 0

    def check_settings(self, template: nn.Module) -> bool:
        """Whether a setting of one of torch's own layers in ``template`` changed since the
        last look (``sizes`` is then emptied and ``epoch`` moved on)."""
        if self.settings is not None and all(
            len(d) == size and all(map(operator.is_, _settings_of(d), values))
            for d, size, values in self.settings
        ):
            return False
        first = self.settings is None
        self.settings = [
            (m.__dict__, len(m.__dict__), tuple(_settings_of(m.__dict__)))
            for m in template.modules()
            if type(m).__module__.startswith("torch.")
        ]
        if first:
            return False
        self.sizes.clear()
        self.epoch += 1
        return True

    def blocks_of(self, size: int, call: Call) -> _Blocks:
        """The blocks of ``size`` members, cut now if not yet, mirroring the template."""
        blocks = self.blocks.get(size)
        if blocks is None:
            blocks = self.blocks[size] = _cut(call.template, call.n, size)
        elif not blocks.current():
            blocks.refresh()
        return blocks

    def release_views(self) -> None:
        for blocks in self.blocks.values():
            blocks.release_views()

    def describe(self) -> str:
        if self.last is None:
            return "in blocks"
        sizes = sorted({e - s for s, e in self.last.bounds}, reverse=True)
        return (
            f"{len(self.last.bounds)} blocks of {' or '.join(map(str, sizes))} members, each "
            "through its own fused program (the activations stay in cache)"
        )


def blocked_forward(
    call: Call, plan: BlockedPlan, fused: FusedPlan
) -> tuple[Any, Callable[..., Any] | None]:
    """Run ``call`` in blocks of members; also a function that runs the same signature again
    from its dynamic inputs (member dim first), for the ensemble's fast path: it raises
    ``Unblockable`` once the blocks no longer show the template. ``fused``: the whole
    ensemble's programs (the block size is found from the program of this signature).

    Raises:
        Unblockable: this call is not to run in blocks (the reason is kept per signature).
    """
    if fwAD._current_level >= 0:  # (a view of a detached tensor carries no tangent)
        raise Unblockable("forward-mode AD")
    program, dynamic, key = program_for(call, fused)
    if isinstance(program, str):
        raise Unblockable(program)
    # (the signature leaves sizes out; the activations' bytes depend on them, and on the
    # weights' dtypes where the forward casts to them)
    key = (
        key,
        frozenset(t.dtype for t in call.state.values()),
        *[(t.shape, t.dtype) for t in pytree.tree_leaves(dynamic) if isinstance(t, Tensor)],
    )
    plan.check_settings(call.template)
    size = plan.sizes.recall(key)
    if size is None:
        size = _block_size(call, program, dynamic)
        plan.sizes.remember(key, size)
    if isinstance(size, str):
        raise Unblockable(size)
    blocks = plan.blocks_of(size, call)
    plan.last = blocks
    outs = []
    for (s, e), template, block_plan in zip(blocks.bounds, blocks.templates, blocks.plans):
        args = tuple(_rows(a, d, s, e) for a, d in zip(call.args, call.in_dims))
        sub = Call(template, e - s, args, call.kwargs, call.in_dims, call.randomness, None)
        outs.append(fused_forward(sub, block_plan))
    return stack_outputs(outs, torch.cat), _runner(plan, blocks, call)


def _rows(arg: Any, dim: int | None, s: int, e: int) -> Any:
    """Members ``s:e`` of a positional input whose member dim is ``dim`` (``None``: shared)."""
    if dim is None:
        return arg
    return pytree.tree_map_only(Tensor, lambda t: t.narrow(dim, s, e - s), arg)


def _runner(plan: BlockedPlan, blocks: _Blocks, call: Call) -> Callable[..., Any] | None:
    """What runs ``blocks`` again for the signature of ``call`` (tensor inputs only, each with
    the member dim first or none: the fast path's calls), or ``None``."""
    if not call.tensor_args or len(set(call.in_dims)) != 1:
        return None
    batched = call.in_dims[0] is not None
    programs = [plan.last for plan in blocks.plans]
    if not all(isinstance(p, FusedProgram) for p in programs):
        return None
    runs = [p.runner(None, True) for p in programs]  # type: ignore[union-attr]
    bounds, template = blocks.bounds, call.template  # (not the call: it holds the inputs)

    epoch = plan.epoch

    def run(*dynamic: Tensor) -> Any:
        if fwAD._current_level >= 0:
            raise Unblockable("forward-mode AD")
        if not blocks.current() and not plan.check_settings(template):
            blocks.refresh()
        if plan.epoch != epoch:  # (this call or another saw a setting change)
            raise Unblockable("a setting of a layer changed: the call is sized again")
        plan.last = blocks
        outs = []
        for (s, e), go in zip(bounds, runs):
            args = [a[s:e] for a in dynamic] if batched else dynamic
            outs.append(contiguous_outputs(go(*args)))
        return stack_outputs(outs, torch.cat)

    return run

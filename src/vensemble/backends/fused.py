"""The ``fused`` backend: the member's forward traced once, rewritten to run all members at once.

``torch.fx`` traces the member's forward; each layer the library knows becomes a batched
kernel (:mod:`._layers`), each tensor function or method a batched call (:mod:`._ops`), and
any other submodule runs through ``auto`` (vmap, or a per-member loop where vmap cannot).
Values that are the same for every member (a shared input, sizes) stay unbatched until a
per-member tensor meets them: a shared input meets the first layer's stacked weights as
one wide matrix multiply. The rewritten graph is compiled to Python code once per call
signature (which inputs are tensors, which carry the member dim, the non-tensor values).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import operator
import os
import threading
import time
import warnings
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch import Tensor, nn
from torch.nn.modules import module as module_globals

from ._call import Call, hold_attributes, put_back_attributes
from ._layers import (
    FRESH_OUTPUT,
    LAYOUT_BLIND,
    LAYOUT_FOLLOWS_INPUT,
    PROGRAM_SIGNATURE,
    READS_ANY_LAYOUT,
    ConvBatchNorm,
    Fused,
    _BatchNorm,
    _Conv,
    _is_compiling,
    _is_tracing,
    fused_layer_for,
)
from ._ops import (
    IN_PLACE_OPERATORS,
    RANDOM_FUNCTIONS,
    RANDOM_METHODS,
    DrawIntoCopies,
    Elementwise,
    Expand,
    IntoMemberCopies,
    Op,
    SetItem,
    _DimMethod,
    _Logical,
    make_op,
)
from .select import AutoPlan, auto_forward

__all__ = [
    "Afresh",
    "FusedPlan",
    "FusedProgram",
    "Memo",
    "Untraceable",
    "activations_in_place",
    "build_program",
    "fused_forward",
    "hooked",
    "hooks_registered",
    "mark_unseen_layouts",
    "program_for",
    "signature_key",
    "sole_input",
    "tracing_now",
]

_RANDOM_MODULES = (
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.FeatureAlphaDropout,
    nn.RReLU,
)
_ASSERTS = {torch._assert, torch.fx._symbolic_trace._assert_is_none}


class Untraceable(Exception):
    """The member's forward cannot be traced or rewritten (data-dependent control flow, ...)."""


class _Submodule(nn.Module):
    """A submodule with no fused kernel: run it through ``auto`` (vmap, or a loop)."""

    def __init__(
        self, orig: nn.Module, path: str, n: int, flags: tuple[bool, ...], randomness: str
    ) -> None:
        super().__init__()
        object.__setattr__(self, "orig", orig)
        self.path = path
        self.n = n
        self.flags = flags
        self.randomness = randomness
        self.plan = AutoPlan()

    orig: nn.Module

    @property
    def how(self) -> str:
        if self.plan.looped:
            return "per-member loop: " + "; ".join(
                f"{p or 'all'}: {r}" for p, r in self.plan.reasons.items()
            )
        return "vmap"

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        in_dims = tuple(0 if f else None for f in self.flags)
        call = Call(self.orig, self.n, args, kwargs, in_dims, self.randomness, None, name=self.path)
        return auto_forward(call, self.plan)


def _signature(args: tuple[Any, ...]) -> tuple[Any, ...]:
    """What decides the layers' measured choices for a call: each tensor input's shape,
    strides, dtype and device, other inputs' types, the autograd mode, deterministic
    algorithms (no measuring: nothing is remembered) and autocast."""
    leaves = pytree.tree_leaves(args)
    return (
        torch.is_grad_enabled(),
        torch.are_deterministic_algorithms_enabled(),
        *[
            (device, torch.get_autocast_dtype(device))
            for device in ("cpu", "cuda")
            if torch.is_autocast_enabled(device)
        ],
        *[
            (t.shape, t.stride(), t.dtype, t.device) if isinstance(t, Tensor) else type(t)
            for t in leaves
        ],
    )


def contiguous_outputs(out: Any) -> Any:
    """Outputs laid out as the loop's are (batched kernels may return transposed views)."""
    if isinstance(out, Tensor):
        return out.contiguous()
    return pytree.tree_map_only(Tensor, torch.Tensor.contiguous, out)


@dataclass
class FusedProgram:
    """A member forward rewritten for all members; call it with the dynamic inputs in order."""

    module: fx.GraphModule
    parts: dict[str, nn.Module] = field(default_factory=dict)
    compiled: Any = None
    warmup_s: float | None = None
    no_grad: fx.GraphModule | None = None  # ``module`` with each layer's no-autograd entry
    # each input signature run eagerly before compiling (see _run_compiled), numbered
    settled_for: dict[tuple[Any, ...], int] = field(default_factory=dict)

    def release_views(self) -> None:
        """Drop the layers' cached views of the parameters (rebuilt on the next call)."""
        for part in self.parts.values():
            if isinstance(part, Fused):
                part.release_views()

    @property
    def routes(self) -> dict[str, str]:
        """Each traced layer or batched op, and how it runs now."""
        return {name: str(getattr(m, "how", type(m).__name__)) for name, m in self.parts.items()}

    def __call__(self, *dynamic: Any, compile_options: dict[str, Any] | None = None) -> Any:
        """Run the program; with ``compile_options`` through ``torch.compile`` after one eager
        call (which settles the kernels chosen by measurement)."""
        eager_no_grad = not (torch.is_grad_enabled() or _is_tracing())
        return contiguous_outputs(self.runner(compile_options, eager_no_grad)(*dynamic))

    def runner(
        self, compile_options: dict[str, Any] | None, eager_no_grad: bool
    ) -> Callable[..., Any]:
        """What runs the program for this compile option, in eager mode without autograd or
        not (the ensemble's fast path keeps it per call key). Its outputs may be views: pass
        them to :func:`contiguous_outputs`."""
        if compile_options is not None:
            return functools.partial(self._run_compiled, compile_options)
        if eager_no_grad:
            return (self.no_grad or self._build_no_grad()).forward
        return self.module.forward  # forward: GraphModule.__call__ adds nothing we need

    def _run_compiled(self, compile_options: dict[str, Any], *dynamic: Any) -> Any:
        """The compiled program; each new input signature (see :func:`_signature`) first runs
        eagerly once. That call makes every choice the layers make by measurement (a kernel,
        a result's layout) for those inputs, so the compiled program only reads them: one
        graph, where a choice made inside it would break the graph at each layer (and dynamo,
        seeing each layer's shapes at the same resume points, made them all dynamic, which
        inductor could fail to compile). The layouts are read back by this signature (see
        ``PROGRAM_SIGNATURE``): a key built from a compiled tensor's strides can differ from
        the eager one's on a size-1 dim."""
        if _is_compiling():  # inside the caller's own torch.compile: traced through
            return self.module(*dynamic)
        signature = _signature(dynamic)
        number = self.settled_for.get(signature)
        outer = PROGRAM_SIGNATURE[0]
        try:
            if number is None:
                PROGRAM_SIGNATURE[0] = number = len(self.settled_for)
                out = self.module(*dynamic)
                self.settled_for[signature] = number  # (only once the eager call went through)
                if self.compiled is None:
                    self.compiled = torch.compile(self.module, **compile_options)
                return out
            PROGRAM_SIGNATURE[0] = number
            if self.warmup_s is None:
                start = time.perf_counter()
                out = self.compiled(*dynamic)
                self.warmup_s = time.perf_counter() - start
                return out
            return self.compiled(*dynamic)
        finally:
            PROGRAM_SIGNATURE[0] = outer

    def _build_no_grad(self) -> fx.GraphModule:
        """``module``, calling each layer's ``forward_no_grad`` where it has one: the eager
        entry without autograd, which skips the per-layer mode checks (the program has made
        them once for the whole call)."""
        graph = fx.Graph()
        graph._codegen = self.module.graph._codegen  # the same calling convention
        graph.output(graph.graph_copy(self.module.graph, {}))
        for node in graph.nodes:
            layer = getattr(node.target, "__self__", None) if node.op == "call_function" else None
            entry = getattr(layer, "forward_no_grad", None)
            if isinstance(layer, Fused) and entry is not None:
                node.target = entry
        self.no_grad = fx.GraphModule(self.module, graph, class_name="FusedMembersNoGrad")
        return self.no_grad


def _forward_parameters(template: nn.Module) -> list[inspect.Parameter]:
    params = list(inspect.signature(template.forward).parameters.values())
    if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params):
        raise Untraceable("the member's forward takes *args or **kwargs")
    return params


def _is_dynamic(value: Any) -> bool:
    return any(isinstance(t, Tensor) for t in pytree.tree_leaves(value))


def signature_key(
    call: Call, signature: inspect.Signature | None = None
) -> tuple[Hashable, list[Any]]:
    """A cache key for ``call``'s signature, and its dynamic (tensor) inputs in order.

    Non-tensor inputs are baked into the traced program, so their values are part of the key.
    """
    signature = signature or inspect.signature(call.template.forward)
    params = list(signature.parameters.values())
    if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params):
        raise Untraceable("the member's forward takes *args or **kwargs")
    if (
        not call.kwargs
        and len(call.args) <= len(params)
        and all(p.kind == p.POSITIONAL_OR_KEYWORD for p in params[: len(call.args)])
    ):
        arguments = dict(zip((p.name for p in params), call.args))
        for p in params[len(call.args) :]:
            if p.default is p.empty:
                raise Untraceable(f"missing argument {p.name!r}")
            arguments[p.name] = p.default
    else:
        try:
            bound = signature.bind(*call.args, **call.kwargs)
        except TypeError as err:
            raise Untraceable(str(err)) from None
        bound.apply_defaults()
        arguments = dict(bound.arguments)
    key: list[Hashable] = []
    dynamic: list[Any] = []
    for k, (name, value) in enumerate(arguments.items()):
        if isinstance(value, Tensor) or _is_dynamic(value):
            d = call.in_dims[k] if k < len(call.args) else None
            if isinstance(value, Tensor):  # the common case, without pytree
                value = value if not d else value.movedim(d, 0)
                key.append((name, "tensor", d is not None, "T"))
            else:
                if d:
                    move = functools.partial(torch.movedim, source=d, destination=0)
                    value = pytree.tree_map_only(Tensor, move, value)
                key.append((name, "tensor", d is not None, str(pytree.tree_structure(value))))
            dynamic.append(value)
        else:
            try:
                hash(value)
            except TypeError:
                raise Untraceable(f"argument {name!r} is neither a tensor nor hashable") from None
            key.append((name, "const", type(value).__name__, value))
    return tuple(key), dynamic


def _refuse(what: str, original: Callable[..., Any]) -> Any:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        if threading.get_ident() in _TRACING:
            raise Untraceable(what)
        return original(*args, **kwargs)

    return refuse


# The threads tracing a member now (with how deeply), and how to undo each of the patches
# _guarded() makes: torch's own functions are replaced process-wide, but refuse only in a
# tracing thread (another thread's `with torch.no_grad()` or `torch.randn` runs as usual).
# One trace runs at a time (_TRACE_LOCK): fx replaces nn.Module.__call__ and __getattr__
# process-wide too, and puts back what it found when it started, so an overlapping trace
# left fx's wrapper in place for good.
_TRACING: dict[int, int] = {}
_PATCH_LOCK = threading.Lock()
_TRACE_LOCK = threading.RLock()
_UNDO: list[Callable[[], None]] = []


def _patch() -> None:
    function = torch.autograd.function.Function
    apply, set_grad = function.__dict__["apply"], torch._C._set_grad_enabled
    refused_apply = _refuse("the forward calls a custom autograd.Function", apply.__func__)
    function.apply = classmethod(refused_apply)  # type: ignore[method-assign, assignment]
    _UNDO.append(lambda: setattr(function, "apply", apply))
    what = "the forward changes grad mode (no_grad / enable_grad)"
    torch._C._set_grad_enabled = _refuse(what, set_grad)
    _UNDO.append(lambda: setattr(torch._C, "_set_grad_enabled", set_grad))
    for name in _RANDOM_FACTORIES:
        fn = getattr(torch, name)
        setattr(torch, name, _traced_only(fn, f"torch.{name}"))
        _UNDO.append(functools.partial(setattr, torch, name, fn))
    for name in sorted(RANDOM_METHODS):
        own = torch.Tensor.__dict__.get(name, _ABSENT)
        method = getattr(torch.Tensor, name)
        setattr(torch.Tensor, name, _traced_only(method, f"Tensor.{name}"))
        _UNDO.append(functools.partial(_put_back_method, name, own))
    for name in _AUGMENTED:
        setattr(fx.Proxy, f"__{name}__", _augmented(name))
        _UNDO.append(functools.partial(delattr, fx.Proxy, f"__{name}__"))
    setattr(fx.Proxy, "__setitem__", _record_setitem)  # noqa: B010 (a class attribute)
    _UNDO.append(functools.partial(delattr, fx.Proxy, "__setitem__"))


def _unpatch() -> None:
    """Undo every patch made (all of them, or those made before one failed)."""
    while _UNDO:
        _UNDO.pop()()


@contextlib.contextmanager
def _guarded() -> Iterator[None]:
    """While tracing, refuse what fx would silently drop: a custom autograd.Function's backward
    (fx traces into its forward) and grad-mode changes (``no_grad`` blocks leave no trace)."""
    me = threading.get_ident()
    with _PATCH_LOCK:
        if not _TRACING:
            try:
                _patch()
            except BaseException:
                _unpatch()
                raise
        _TRACING[me] = _TRACING.get(me, 0) + 1
    try:
        yield
    finally:
        with _PATCH_LOCK:
            depth = _TRACING.pop(me, 0) - 1  # (0: a child forked mid-trace cleared it)
            if depth > 0:
                _TRACING[me] = depth
            if not _TRACING:
                _unpatch()


def tracing_now() -> bool:
    """Whether this thread is tracing a member's forward now."""
    return threading.get_ident() in _TRACING


def _after_fork_in_child() -> None:
    """A child forked while another thread traced: that thread is gone, and so are the
    locks' owners."""
    global _PATCH_LOCK, _TRACE_LOCK
    _PATCH_LOCK, _TRACE_LOCK = threading.Lock(), threading.RLock()
    _TRACING.clear()
    _unpatch()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class _Tracer(fx.Tracer):
    """fx's tracer for the calling thread only: while it traces, a module that another thread
    calls or reads (through the process-wide wrappers fx installs) runs as usual."""

    def __init__(self) -> None:
        super().__init__()
        self.thread = threading.get_ident()

    def call_module(
        self, m: nn.Module, forward: Callable[..., Any], args: Any, kwargs: dict[str, Any]
    ) -> Any:
        if threading.get_ident() != self.thread:
            return forward(*args, **kwargs)
        return super().call_module(m, forward, args, kwargs)

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict[str, Any]) -> Any:
        if threading.get_ident() != self.thread:
            return attr_val
        if isinstance(attr_val, Tensor) and not isinstance(attr_val, nn.Parameter):
            # a parameter slot holding a plain tensor (torch.func.functional_call puts the
            # tensors it is given there): read at run time, as a Parameter is. fx would take
            # it for a constant: the program would run every later call with these values,
            # and as one tensor shared by all members (w.sum() summed over the members)
            for name, p in self.root.named_parameters():
                if p is attr_val:
                    if name not in parameter_proxy_cache:
                        proxy = self.create_proxy("get_attr", name, (), {})
                        parameter_proxy_cache[name] = proxy
                    return parameter_proxy_cache[name]
        return super().getattr(attr, attr_val, parameter_proxy_cache)


# Augmented assignments: a Proxy without ``__iadd__`` makes Python run ``h = h + 1``, which
# fx records as an out-of-place add; a tensor's ``h += 1`` writes into ``h`` (a view taken
# before sees the change, and so does a caller whose input it was). Recorded as
# ``operator.iadd`` and the like, they run in place.
_AUGMENTED = sorted(op.__name__ for op in IN_PLACE_OPERATORS)


def _augmented(name: str) -> Callable[..., Any]:
    target = getattr(operator, name)

    def record(self: fx.Proxy, other: Any) -> fx.Proxy:
        return self.tracer.create_proxy("call_function", target, (self, other), {})

    return record


def _record_setitem(self: fx.Proxy, index: Any, value: Any) -> None:
    """``h[index] = value`` on a traced value: recorded (a Proxy has no ``__setitem__``, and
    fx's trace failed), as ``operator.setitem``; later reads of ``h`` see the write."""
    self.tracer.create_proxy("call_function", operator.setitem, (self, index, value), {})


# Random draws without a traced input would run once at trace time and be frozen into the
# program as a constant, the same for every member and every call; the loop draws anew on
# every call. The factories, and the tensor methods that draw (in place into a tensor made
# from constants: torch.empty(3).normal_(), as torch.distributions and nn.init draw).
_RANDOM_FACTORIES = (
    "rand",
    "randn",
    "randint",
    "randperm",
    "normal",
    "bernoulli",
    "poisson",
    "multinomial",
    "rand_like",
    "randn_like",
    "randint_like",
)
_ABSENT = object()


def _traced_only(fn: Any, what: str) -> Any:
    def guarded(*args: Any, **kwargs: Any) -> Any:
        if threading.get_ident() in _TRACING and not any(
            isinstance(a, fx.Proxy) for a in pytree.tree_leaves((args, kwargs))
        ):
            raise Untraceable(
                f"the forward calls {what} without a traced input (it would be frozen)"
            )
        return fn(*args, **kwargs)

    return guarded


def _put_back_method(name: str, own: Any) -> None:
    """Undo a patch of ``torch.Tensor.<name>``: ``own`` is what its class dict held."""
    if own is _ABSENT:
        delattr(torch.Tensor, name)
    else:
        setattr(torch.Tensor, name, own)


_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
# torch's global module hook dicts (registering a global hook adds to them in place)
_GLOBAL_HOOK_DICTS: tuple[dict[int, Any], ...] = tuple(
    getattr(module_globals, f"_global{name}") for name in _HOOK_DICTS
)


def hooks_registered(modules: list[nn.Module]) -> bool:
    """Whether a module hook (forward or backward, on one of ``modules`` or global) is set.

    A fused program calls no ``nn.Module.__call__``, so it would skip them: ``Ensemble`` then
    runs the members one by one. Checked on every call (``Ensemble`` keeps the dicts and asks
    :func:`hooked`), since hooks may come after a program was built.
    """
    return hooked(hook_dicts(modules))


def hooked(dicts: list[dict[int, Any]]) -> bool:
    """Whether one of ``dicts`` (from :func:`hook_dicts`) or a global module hook dict holds a
    hook: two C-level passes."""
    return any(_GLOBAL_HOOK_DICTS) or any(dicts)


def hook_dicts(modules: list[nn.Module]) -> list[dict[int, Any]]:
    """The dicts that hold the forward/backward hooks of ``modules``.

    Registering a hook adds it to one of these dicts in place (only unpickling replaces them,
    and that makes new modules), so a list of them kept from the start answers
    :func:`hooked` in about 1 us per check, where a walk over the modules' attributes costs
    9 us once a batched layer has pushed them out of the CPU's cache.
    """
    return [getattr(m, name) for m in modules for name in _HOOK_DICTS]


def _check_hooks(template: nn.Module) -> None:
    for path, m in template.named_modules():
        if hooks_registered([m]):
            raise Untraceable(
                f"module '{path or type(m).__name__}' has hooks (fx does not run them)"
            )
    if hooks_registered([]):
        raise Untraceable("global module hooks are registered (fx does not run them)")


# Never traced by dynamo (a first call from inside torch.compile): _guarded() patches torch's
# own functions for the trace and must put them back, which dynamo's replay of a graph-broken
# `with` block did not do (every later grad-mode switch in the process raised Untraceable).
@torch.compiler.disable
def _trace(template: nn.Module, concrete: dict[str, Any], constants: dict[str, Any]) -> fx.Graph:
    _check_hooks(template)
    tracer = _Tracer()
    # buffers as graph inputs, as parameters are: else an op on a buffer alone (a scaler's
    # `sigma.clamp(...)`, an EMA update in place) runs once, here, on the stacked buffer
    tracer.proxy_buffer_attributes = True
    if tracer.is_leaf_module(template, ""):
        graph = fx.Graph()
        args: list[Any] = []
        kwargs: dict[str, Any] = {}
        for p in _forward_parameters(template):
            value = concrete[p.name] if p.name in concrete else graph.placeholder(p.name)
            if p.kind == p.KEYWORD_ONLY:
                kwargs[p.name] = value
            else:
                args.append(value)
        graph.output(graph.call_module("", tuple(args), kwargs))
        return graph
    before = set(template.__dict__)
    held = hold_attributes(template, slots=True)
    try:
        with _TRACE_LOCK, _guarded():
            graph = tracer.trace(template, concrete_args=concrete)
    except Untraceable:
        raise
    except Exception as err:
        raise Untraceable(
            f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        ) from None
    finally:  # fx stores tensor constants on the traced module: keep them off the template
        for name in set(template.__dict__) - before:
            constants[name] = template.__dict__.pop(name)
        # what the forwards stored on their modules while tracing (``self.last = h``: a Proxy)
        stored = put_back_attributes(held)
    for path, name, value in stored:
        module = template.get_submodule(path)
        own = name in module._buffers or name in module._parameters  # stacked: per member
        if (
            isinstance(value, fx.Proxy)
            and own
            and _written_back(value, f"{path}.{name}".lstrip("."))
        ):
            continue  # (self.count += 1 on a buffer: the in-place op is in the program)
        # a side effect the program would drop: a traced value, or a plain one (self.calls
        # += 1 on an int: the program would compute with the value the trace saw, for good)
        raise Untraceable(
            f"the forward of '{path or type(template).__name__}' stores '{name}' on the "
            "module (fx keeps no such assignment)"
        )
    return graph


_IN_PLACE_OPERATORS = frozenset(IN_PLACE_OPERATORS) | {operator.setitem}


# What makes new memory that nothing else refers to yet: a shared value made by one of these,
# written in place only by a per-member augmented assignment (its one reader), may be copied
# per member first (out = torch.zeros_like(x); out += layer(x)): each member's is its own
# (not pow: 2 ** x saves its result for the backward, which the member's write would break)
_FRESH_FUNCTIONS = frozenset({
    torch.zeros_like, torch.ones_like, torch.empty_like, torch.full_like, torch.zeros,
    torch.ones, torch.full, torch.empty, torch.clone, torch.add, torch.sub, torch.mul, torch.div,
    operator.add, operator.sub, operator.mul, operator.truediv, operator.floordiv, operator.mod,
    operator.neg, operator.matmul,
})  # fmt: skip
_FRESH_METHODS = frozenset({"clone", "new_zeros", "new_ones", "new_full", "new_empty", "add",
                            "sub", "mul", "div"})  # fmt: skip


# Conversions that make new memory, saved by no backward, unless they return their input
# itself (x.float() of a float tensor): checked when the program runs (see IntoMemberCopies)
_CONVERSIONS = frozenset({"float", "double", "half", "bfloat16", "to", "type_as", "contiguous"})


def _fresh_for(value: Any, writer: fx.Node) -> str | None:
    """Whether ``value`` is new memory that only ``writer`` reads: ``"fresh"`` for one of
    ``_FRESH_FUNCTIONS`` / ``_FRESH_METHODS`` (not an input or a view of one, no alias of it
    taken before the write), ``"conversion"`` for one of ``_CONVERSIONS`` (``x = obs.float()``:
    new memory unless it returned its input, checked when the program runs), else ``None``."""
    if not isinstance(value, fx.Node) or set(value.users) != {writer} or "out" in value.kwargs:
        return None
    if value.op == "call_function":
        return "fresh" if value.target in _FRESH_FUNCTIONS else None
    if value.op != "call_method":
        return None
    if value.target in _FRESH_METHODS:
        return "fresh"
    return "conversion" if value.target in _CONVERSIONS else None


def _fresh_until(value: Any, writer: fx.Node) -> bool:
    """Whether ``value`` is new memory (one of ``_FRESH_FUNCTIONS`` / ``_FRESH_METHODS``) that
    nothing read before ``writer`` but item assignments into it: from ``writer`` on, its
    readers may read each member's copy instead (no alias of the shared one was taken)."""
    if not isinstance(value, fx.Node) or "out" in value.kwargs:
        return False
    made = value.target in (_FRESH_FUNCTIONS if value.op == "call_function" else _FRESH_METHODS)
    if value.op not in ("call_function", "call_method") or not made:
        return False
    before = set()
    for node in value.graph.nodes:  # (in order: the readers that come before the writer)
        if node is writer:
            break
        before.add(node)
    return all(
        u.op == "call_function" and u.target is operator.setitem and u.args[0] is value
        for u in value.users
        if u in before
    )


def _written_back(value: fx.Proxy, target: str) -> bool:
    """Whether ``value``, assigned to the module attribute ``target``, is that attribute
    itself, modified in place (``self.count += 1``: Python assigns the result back). The
    in-place op is in the program; the assignment changes nothing."""
    node = value.node
    first = node.args[0] if node.op == "call_function" and node.args else None
    return (
        node.target in IN_PLACE_OPERATORS
        and isinstance(first, fx.Node)
        and first.op == "get_attr"
        and first.target == target
    )


def _writes_in_place(node: fx.Node) -> list[Any]:
    """What ``node`` modifies in place: its first argument for an in-place method, function
    or operator (``add_``, ``torch.relu_``, ``+=``, ``x[i] = v``, ``inplace=True``), and
    its ``out=`` tensor."""
    written = [node.kwargs["out"]] if "out" in node.kwargs else []
    if node.op not in ("call_method", "call_function") or not node.args:
        return written
    name = str(node.target) if node.op == "call_method" else getattr(node.target, "__name__", "")
    in_place = (
        (name.endswith("_") and not name.startswith("_"))
        or (name.startswith("__i") and name.endswith("__"))
        or name == "__setitem__"
        or node.kwargs.get("inplace") is True
        or (node.op == "call_function" and node.target in _IN_PLACE_OPERATORS)
    )
    return [node.args[0], *written] if in_place else written


def _refuse_writes_to_constants(graph: fx.Graph, constants: dict[str, Any]) -> None:
    """A tensor the forward makes from constants alone (``s = torch.zeros(4)``) is made once,
    by the trace, and would be the same tensor on every call: written in place (``s += ...``),
    it would keep its sums from call to call. vmap runs such a forward as written."""
    for node in graph.nodes:
        for target in _writes_in_place(node):
            if (
                isinstance(target, fx.Node)
                and target.op == "get_attr"
                and str(target.target) in constants
            ):
                raise Untraceable(
                    f"the forward modifies in place ({node.target}) a tensor it made from "
                    "constants: the trace would make it once for every call"
                )


# Views a write may go through, back to the tensor they view; those that may copy on the
# stacked tensor where the member's own would not (reshape: a Linear weight is stacked in-major)
_VIEWS = frozenset({"view", "reshape", "flatten", "view_as", "reshape_as", "unflatten", "t",
                    "transpose", "permute", "unsqueeze", "squeeze", "narrow", "select",
                    "expand", "as_strided", "mT", "T"})  # fmt: skip
_MAY_COPY = frozenset({"view", "reshape", "flatten", "view_as", "reshape_as", "unflatten",
                       torch.reshape, torch.flatten})  # fmt: skip
_VIEW_FUNCTIONS = frozenset({operator.getitem, torch.reshape, torch.flatten, getattr})


def _refuse_writes_through_reshapes(graph: fx.Graph) -> None:
    """A write into a parameter or buffer through its ``view``/``reshape`` (``w =
    self.fc.weight.view(-1); w[:2] = 0``): on the stacked tensor, whose layout may differ from
    the member's (in-major Linear weights), the reshape can be a copy, and the write would be
    lost. vmap runs such a forward as written."""
    for node in graph.nodes:
        for target in _writes_in_place(node):
            reshaped, cur = False, target
            while (
                isinstance(cur, fx.Node)
                and cur.args
                and (
                    (cur.op == "call_method" and cur.target in _VIEWS)
                    or (cur.op == "call_function" and cur.target in _VIEW_FUNCTIONS)
                )
            ):
                reshaped = reshaped or cur.target in _MAY_COPY
                cur = cur.args[0]
            if reshaped and isinstance(cur, fx.Node) and cur.op == "get_attr":
                raise Untraceable(
                    f"the forward writes in place ({node.target}) into '{cur.target}' through a "
                    "reshape of it (on the stacked tensor the reshape may be a copy)"
                )


def _has_state(module: nn.Module) -> bool:
    return next(module.parameters(), None) is not None or next(module.buffers(), None) is not None


def build_program(call: Call, key: Hashable) -> FusedProgram:
    """Trace ``call.template`` for this call signature and rewrite it for all members.

    Raises:
        Untraceable: the forward cannot be traced or rewritten; use vmap instead.
    """
    template, n, randomness = call.template, call.n, call.randomness
    entries = {k[0]: k for k in key}  # type: ignore[attr-defined]
    concrete = {name: e[3] for name, e in entries.items() if e[1] == "const"}
    batched_inputs = {name for name, e in entries.items() if e[1] == "tensor" and e[2]}
    constants: dict[str, Any] = {}
    graph = _trace(template, concrete, constants)
    _refuse_writes_to_constants(graph, constants)
    _refuse_writes_through_reshapes(graph)
    stacked = {name for name, _ in template.named_parameters(remove_duplicate=False)}
    stacked |= {name for name, _ in template.named_buffers(remove_duplicate=False)}

    new = fx.Graph()
    env: dict[fx.Node, Any] = {}
    flag: dict[fx.Node, bool] = {}
    root: dict[str, Any] = {}
    parts: dict[str, nn.Module] = {}
    placeholders = iter(p.name for p in _forward_parameters(template))
    expander = "_expand"
    root[expander] = Expand(n)

    def add(module: nn.Module, prefix: str) -> str:
        name = f"{prefix}{len(root)}"
        root[name] = module
        return name

    def nodes_in(a: Any) -> list[fx.Node]:
        found: list[fx.Node] = []
        fx.node.map_arg(a, lambda x: found.append(x) or x)  # type: ignore[func-returns-value]
        return [x for x in found if isinstance(env.get(x), fx.Node)]

    def is_batched(a: Any) -> bool:
        return any(flag.get(x, False) for x in nodes_in(a))

    def mapped(a: Any) -> Any:
        """``a`` in the new graph; in a container that mixes batched and shared values, the
        shared ones get the member dim, so the container is batched throughout."""
        if isinstance(a, fx.Node):
            return env[a]
        if isinstance(a, (tuple, list)) and is_batched(a):
            items = [
                new.call_module(expander, (env[x],))
                if isinstance(x, fx.Node) and not flag.get(x) and isinstance(env[x], fx.Node)
                else mapped(x)
                for x in a
            ]
            return type(a)(items)
        return fx.node.map_arg(a, lambda x: env[x])

    def copies_from_here(node: fx.Node, op: Op, args: Any, kwargs: dict[str, Any]) -> None:
        """``node`` writes into ``args[0]``, a value the forward made the same for every
        member, through ``op``, which copies it per member first: the program's later reads
        of that value read the copies (``_fresh_until`` made sure nothing aliases it)."""
        mapped_kwargs = {k: mapped(v) for k, v in kwargs.items()}
        env[node] = new.call_module(add(op, "_op"), tuple(mapped(a) for a in args), mapped_kwargs)
        flag[node] = True
        env[args[0]], flag[args[0]] = env[node], True
        parts[f"{getattr(node.target, '__name__', node.target)} ({node.name})"] = op

    for node in graph.nodes:
        if node.op == "placeholder":
            name = next(placeholders)
            if name in concrete:
                env[node] = concrete[name]
                continue
            env[node] = new.placeholder(name)
            flag[node] = name in batched_inputs
        elif node.op == "get_attr":  # read at run time: the template's tensors may be replaced
            reader = _Attr(template, node.target, constants.get(node.target))
            env[node] = new.call_module(add(reader, "_attr"), ())
            flag[node] = node.target in stacked
        elif node.op in ("call_function", "call_method"):
            if node.op == "call_function" and node.target in _ASSERTS:
                continue
            args, kwargs = node.args, node.kwargs
            if not nodes_in((args, kwargs)):  # only constants (specialised inputs): fold now
                env[node] = _evaluate(
                    node,
                    fx.node.map_arg(args, lambda x: env[x]),
                    fx.node.map_arg(kwargs, lambda x: env[x]),
                )
                continue
            flags = tuple(is_batched(a) for a in args)
            kwflags = {k: is_batched(v) for k, v in kwargs.items()}
            random = node.target in (
                RANDOM_METHODS if node.op == "call_method" else RANDOM_FUNCTIONS
            )
            if not any(flags) and not any(kwflags.values()) and not random:
                env[node] = new.node_copy(node, lambda x: env[x])
                flag[node] = False
                continue
            if node.target is operator.setitem and not flags[0]:
                if not _fresh_until(args[0], node):
                    raise Untraceable(  # (vmap refuses it too: the per-member loop runs it)
                        "the forward writes a per-member value into a tensor that is the same "
                        "for every member, and not one it made itself (out[...] = h)"
                    )
                # out = x.new_zeros(...); out[:, :4] = h: each member's out its own from here
                copies = SetItem(node.target, False, (True, *flags[1:]), {}, n, randomness, into_copies=True)  # fmt: skip
                copies_from_here(node, copies, args, kwargs)
                continue
            if (
                node.op == "call_method"
                and node.target in RANDOM_METHODS
                and str(node.target).endswith("_")
                and randomness == "different"
                and not any(flags)
                and not any(kwflags.values())
                and _fresh_until(args[0], node)
            ):  # noise = x.new_empty(x.shape).normal_(): each member's own draws from here
                draws = DrawIntoCopies(
                    node.target, True, (True, *flags[1:]), kwflags, n, randomness
                )
                copies_from_here(node, draws, args, kwargs)
                continue
            attr = args[1] if node.target is getattr and len(args) > 1 else None
            op = make_op(node.target, node.op == "call_method", flags, kwflags, n, randomness, attr)
            fresh = _fresh_for(args[0], node) if node.target in IN_PLACE_OPERATORS else None
            if fresh is not None and not flags[0]:
                op = IntoMemberCopies(
                    node.target, False, (True, *flags[1:]), kwflags, n, randomness
                )
                if fresh == "conversion":  # new memory unless it returned its input
                    kwargs = {**kwargs, "_sources": tuple(env[x] for x in nodes_in(args[0].args))}
                    op.kwflags = {**kwflags, "_sources": False}
            if (
                isinstance(op, Elementwise)
                and node.op == "call_function"
                and not random
                and args
                and nodes_in((args, kwargs)) == [args[0]]
            ):  # one tensor (the batched first argument): nothing to align, call the function
                op.direct = node.target
            target = add(op, "_op")
            env[node] = new.call_module(
                target,
                tuple(mapped(a) for a in args),
                {k: v if k == "_sources" else mapped(v) for k, v in kwargs.items()},
            )
            flag[node] = op.batched_output
            parts[f"{getattr(node.target, '__name__', node.target)} ({node.name})"] = op
        elif node.op == "call_module":
            sub = template.get_submodule(node.target)
            flags = tuple(is_batched(a) for a in node.args)
            kwflags = {k: is_batched(v) for k, v in node.kwargs.items()}
            if (
                not _has_state(sub)
                and not any(flags)
                and not any(kwflags.values())
                and not isinstance(sub, _RANDOM_MODULES)
            ):
                root[node.target] = sub
                env[node] = new.node_copy(node, lambda x: env[x])
                flag[node] = False
                continue
            if any(kwflags.values()):
                raise Untraceable(f"submodule '{node.target}' takes a per-member keyword argument")
            cls = None if node.kwargs else fused_layer_for(sub, flags, randomness)
            wrapper: nn.Module = (
                cls(sub, n, flags, randomness)
                if cls is not None
                else _Submodule(sub, node.target, n, flags, randomness)
            )
            if isinstance(wrapper, Fused) and node.args and _from_inputs_only(node.args[0]):
                wrapper.reads_program_input = True
            target = add(wrapper, "_layer")
            env[node] = new.call_module(
                target,
                tuple(mapped(a) for a in node.args),
                {k: mapped(v) for k, v in node.kwargs.items()},
            )
            flag[node] = True
            parts[node.target or type(sub).__name__] = wrapper
        elif node.op == "output":

            def out(a: Any) -> Any:
                if isinstance(a, fx.Node):
                    value = env[a]
                    if not isinstance(value, fx.Node):
                        raise Untraceable("the member's forward returns a constant")
                    return value if flag.get(a) else new.call_module(expander, (value,))
                if isinstance(a, (tuple, list)):
                    return type(a)(out(x) for x in a)
                if isinstance(a, dict):
                    return {k: out(v) for k, v in a.items()}
                return a

            new.output(out(node.args[0]))
    mark_unseen_layouts(new, root)
    _call_forward_directly(new, root)
    _fold_batchnorms(new)
    activations_in_place(new)
    module = fx.GraphModule(root, new, class_name="FusedMembers")
    return FusedProgram(module, parts)


def _from_inputs_only(arg: Any) -> bool:
    """Whether ``arg`` (a node of the member's traced graph) is one of the program's inputs,
    or comes of them through functions and methods alone (``x.float()``, ``x[:, :3]``,
    ``x * 2``), with no module's output on the way: eager ops and views keep such a tensor's
    size-1 strides as the caller's input has them (see ``Fused.member_input``)."""
    if not isinstance(arg, fx.Node):
        return False
    todo, seen = [arg], {arg}
    while todo:
        node = todo.pop()
        if node.op == "call_module":
            return False
        if node.op in ("call_function", "call_method"):
            for up in node.all_input_nodes:
                if up not in seen:
                    seen.add(up)
                    todo.append(up)
    return True


def mark_unseen_layouts(graph: fx.Graph, root: dict[str, Any]) -> None:
    """Set ``layout_unseen`` on each Linear, convolution and pooling whose output layout
    nothing could tell from the member's: only then may it return the layout its batched
    kernel computes (``y^T = W x^T`` for a narrow Linear, out-major weights, a grouped or
    concatenated conv, pooling of such a conv's output) rather than a copy laid out as the
    member's result is.

    That holds when its output, and whatever comes of it through elementwise ops, reductions
    over dims and layout-blind layers (``LAYOUT_BLIND``), is read only by shape queries, by
    Linear layers, by convolutions and poolings whose own output layout is unseen (theirs
    follows their input's: ``LAYOUT_FOLLOWS_INPUT``), and by the program's output (made
    contiguous). Any other reader may see the difference: a ``view``, ``reshape``,
    ``flatten`` or ``contiguous`` of the member's output aliases it, the stacked one's would
    be a copy (and a write through either lost to the other); a submodule run by vmap or the
    loop may view its input. ``graph``'s modules are still ``call_module`` nodes naming
    ``root``'s entries; the graph is walked from its end, so each reader is decided first.
    """
    for node in reversed(graph.nodes):
        layer = root.get(str(node.target)) if node.op == "call_module" else None
        if isinstance(layer, READS_ANY_LAYOUT):
            layer.layout_unseen = _layout_unseen(node, root)


def _layout_unseen(source: fx.Node, root: dict[str, Any]) -> bool:
    """Whether ``source``'s output layout reaches nothing that could tell it (see
    :func:`mark_unseen_layouts`)."""
    todo, seen = [source], {source}
    while todo:
        for user in todo.pop().users:
            if user in seen or user.op == "output":
                continue
            seen.add(user)
            reader = root.get(str(user.target)) if user.op == "call_module" else None
            if isinstance(reader, LAYOUT_FOLLOWS_INPUT):
                if reader.layout_unseen:
                    continue
                return False  # it lays its result out as the member's, from its input's
            if isinstance(reader, (*READS_ANY_LAYOUT, _Logical)):
                continue
            if (
                isinstance(reader, Elementwise)
                and reader.is_method
                and reader.target == "contiguous"
            ):
                return False  # the member's may return its input itself, the stacked one a copy
            if not isinstance(reader, (Elementwise, *LAYOUT_BLIND)) and not (
                isinstance(reader, _DimMethod) and reader.reduces
            ):
                return False
            todo.append(user)  # its output may keep the layout (or be the same tensor)
    return True


def _call_forward_directly(graph: fx.Graph, root: dict[str, Any]) -> None:
    """Call each module's ``forward`` as a function: no ``nn.Module.__call__`` overhead
    (hooks are refused before tracing and checked by every ensemble call, so there are none
    to run). On the tutorial's MLP, a ``Flatten`` called as a module cost 4% of the call."""
    ours = (Fused, Op, _Submodule, _Attr, Expand)
    called: dict[str, Any] = {}  # a module the forward calls more than once: one function
    for node in list(graph.nodes):
        if node.op != "call_module":
            continue
        target = str(node.target)
        module = root.get(target)
        if target not in called:
            if isinstance(module, ours):
                called[target] = getattr(module, "direct", None) or module.forward
            elif isinstance(module, nn.Module):  # torch's own stateless layers, on shared values
                called[target] = _named_forward(module)
            else:
                continue
        with graph.inserting_before(node):
            direct = graph.call_function(called[target], node.args, node.kwargs)
        node.replace_all_uses_with(direct)
        graph.erase_node(node)
    for target in called:
        del root[target]


def _named_forward(module: nn.Module) -> Any:
    """``module.forward`` under a name fx's code can refer to: fx writes a torch-defined
    function as its import path, which a bound method does not have."""
    fn = functools.partial(module.forward)
    fn.__name__ = f"{type(module).__name__.lower()}_forward"  # type: ignore[attr-defined]
    fn.__module__ = __name__
    return fn


def sole_input(node: fx.Node) -> fx.Node | None:
    """The node whose output is ``node``'s one argument (no other arguments), or ``None``."""
    if len(node.args) == 1 and not node.kwargs and isinstance(node.args[0], fx.Node):
        return node.args[0]
    return None


def _fold_batchnorms(graph: fx.Graph) -> None:
    """A batched conv whose output only a BatchNorm reads becomes one ``ConvBatchNorm``
    (folded in eval mode without autograd)."""
    for node in list(graph.nodes):
        bn = getattr(node.target, "__self__", None)
        source = sole_input(node) if node.op == "call_function" else None
        if not isinstance(bn, _BatchNorm) or source is None or len(source.users) != 1:
            continue
        conv = getattr(source.target, "__self__", None)
        if not isinstance(conv, _Conv) or sole_input(source) is None:
            continue
        pair = ConvBatchNorm(conv, bn)
        with graph.inserting_before(node):
            fused = graph.call_function(pair.forward, source.args)
        node.replace_all_uses_with(fused)
        graph.erase_node(node)
        graph.erase_node(source)
        bn.how = ConvBatchNorm.how  # for explain(): the BatchNorm's part names what it became


# Activations that may overwrite their input when it is a batched layer's own fresh output that
# nothing else reads: no second activation-sized buffer to allocate and fill. On 1000 tiny
# members (16 MB activations) that alone made the forward 1.5x faster; it is safe under
# autograd too: the layers' backward needs their inputs, not their outputs.
_IN_PLACE = {
    torch.relu: torch.relu_,
    nn.functional.relu: torch.relu_,  # traced as F.relu(x, inplace=False)
    torch.tanh: torch.tanh_,
    torch.sigmoid: torch.sigmoid_,
}
_IN_PLACE_MODULES = {nn.ReLU: torch.relu_, nn.Tanh: torch.tanh_, nn.Sigmoid: torch.sigmoid_}


def activations_in_place(
    graph: fx.Graph, fresh: tuple[type, ...] = FRESH_OUTPUT, root: nn.Module | None = None
) -> None:
    """Make each activation whose input only it reads, and which a ``fresh`` producer's bound
    ``forward`` made (new memory, never a view), overwrite that input.

    ``root``: the module the graph's ``call_module`` targets live in; its ``nn.ReLU``,
    ``nn.Tanh`` and ``nn.Sigmoid`` modules count too (a member's traced forward keeps them).
    """
    for node in list(graph.nodes):
        if node.op == "call_function":
            in_place = _IN_PLACE.get(node.target)
        elif node.op == "call_module" and root is not None:
            module = root.get_submodule(str(node.target))
            in_place = (
                None if getattr(module, "inplace", False) else _IN_PLACE_MODULES.get(type(module))
            )
        else:
            continue
        plain = not node.kwargs or dict(node.kwargs) == {"inplace": False}
        source = node.args[0] if len(node.args) == 1 and plain else None
        if in_place is None or not isinstance(source, fx.Node) or len(source.users) != 1:
            continue
        producer = getattr(source.target, "__self__", None)  # a wrapper's bound forward
        if source.op == "call_function" and isinstance(producer, fresh):
            with graph.inserting_before(node):
                replacement = graph.call_function(in_place, (source,))
            node.replace_all_uses_with(replacement)
            graph.erase_node(node)


class _Attr(nn.Module):
    """An attribute of the template (a stacked parameter or buffer, or a constant tensor)."""

    def __init__(self, template: nn.Module, target: str, constant: Any = None) -> None:
        super().__init__()
        object.__setattr__(self, "template", template)
        self.target = target
        self.constant = constant

    template: nn.Module

    def forward(self) -> Any:
        if self.constant is not None:
            return self.constant
        obj: Any = self.template
        for part in self.target.split("."):
            obj = getattr(obj, part)
        return obj


def _evaluate(node: fx.Node, args: Any, kwargs: Any) -> Any:
    if node.op == "call_method":
        return getattr(args[0], node.target)(*args[1:], **kwargs)  # type: ignore[arg-type]
    return node.target(*args, **kwargs)  # type: ignore[operator]


MAX_SIGNATURES = 256  # call signatures remembered at most, per ensemble (programs, choices)


class Memo(dict[Hashable, Any]):
    """What is remembered per call signature (``what`` names it in the warning), at most
    ``MAX_SIGNATURES`` entries, the least recently used dropped: a non-tensor argument that
    takes a new value on every call (a step counter, an annealed temperature) is a new
    signature each time, traced (and, under ``auto``, measured) anew. Warned of once."""

    warned = False

    def __init__(self, what: str = "call signatures") -> None:
        super().__init__()
        self.what = what

    def recall(self, key: Hashable) -> Any:
        """``self.get(key)``, made the most recently used (not while dynamo traces: a side
        effect strict export would warn of)."""
        value = self.get(key)
        if value is not None and not _is_compiling():
            self[key] = self.pop(key)
        return value

    def remember(self, key: Hashable, value: Any) -> None:
        """``self[key] = value``, dropping the least recently used beyond the bound."""
        if len(self) >= MAX_SIGNATURES:
            if not self.warned:
                self.warned = True
                warnings.warn(
                    f"vensemble: over {MAX_SIGNATURES} call signatures ({self.what}): each new "
                    "value of a non-tensor argument is traced (and, under backend='auto', "
                    "measured) anew. Pass a value that changes from call to call as a tensor, "
                    "or use backend='vmap' or 'loop'.",
                    stacklevel=4,
                )
            for old in list(self)[: len(self) - MAX_SIGNATURES + 1]:
                dropped = self.pop(old)
                if isinstance(dropped, FusedProgram):  # its layers let go of the parameters
                    dropped.release_views()  # (the fast path may still hold it)
        self[key] = value


class Afresh:
    """What a plan built for one template holds refers to that template: a copy (deepcopy,
    pickle) starts afresh, with the dataclass's defaults."""

    def __deepcopy__(self, memo: dict[int, Any]) -> Any:
        return type(self)()

    def __getstate__(self) -> dict[str, Any]:
        return {}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__()  # type: ignore[misc]


@dataclass
class FusedPlan:
    """Programs built so far, per call signature; a string where the signature cannot be fused."""

    # a FusedProgram per call signature, or why it cannot be built
    programs: Memo = field(default_factory=lambda: Memo("fused programs"))
    last: FusedProgram | str | None = None
    compile_options: dict[str, Any] | None = None
    signature: inspect.Signature | None = None
    modules: list[nn.Module] = field(default_factory=list)
    tensor_keys: dict[tuple[int, tuple[int | None, ...]], Hashable] = field(default_factory=dict)

    def release_views(self) -> None:
        """Drop the layers' cached views of the parameters (they are rebuilt on the next
        call). Before ``nn.Module._apply`` swaps parameters in place
        (``torch.__future__.set_swap_module_params_on_conversion``): ``swap_tensors`` refuses
        a tensor something else still refers to."""
        for program in [*self.programs.values(), self.last]:
            if isinstance(program, FusedProgram):
                program.release_views()

    def __deepcopy__(self, memo: dict[int, Any]) -> FusedPlan:
        """Programs refer to the template they were traced from: a copy starts afresh."""
        return FusedPlan(compile_options=copy.deepcopy(self.compile_options, memo))

    def __getstate__(self) -> dict[str, Any]:
        return {"compile_options": self.compile_options}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(compile_options=state["compile_options"])  # type: ignore[misc]


def fused_forward(call: Call, plan: FusedPlan) -> Any:
    """Run ``call`` through the fused program for its signature, building it on first use.

    A program calls no ``nn.Module.__call__``: the caller runs calls with module hooks
    registered some other way (``Ensemble.forward`` finds them: see :func:`hook_dicts`; a
    program is never built while hooks are registered).

    Raises:
        Untraceable: this signature cannot be fused (the reason is cached in ``plan``).
    """
    program, dynamic, _ = program_for(call, plan)
    if isinstance(program, str):
        raise Untraceable(program)
    return program(*dynamic, compile_options=plan.compile_options)


def program_for(call: Call, plan: FusedPlan) -> tuple[FusedProgram | str, list[Any], Hashable]:
    """The fused program for ``call``'s signature, built on first use (or why it cannot be:
    a string), with the inputs it takes (the dynamic ones, member dim first) and the key it
    is kept under in ``plan.programs``. ``plan.last`` is set to it (outside torch.compile)."""
    if plan.signature is None:
        plan.signature = inspect.signature(call.template.forward)
        plan.modules = list(call.template.modules())
    quick = (len(call.args), call.in_dims)  # tensor-only calls: the key depends on nothing else
    key = plan.tensor_keys.get(quick) if call.tensor_args else None
    if key is not None:
        dynamic = [a.movedim(d, 0) if d else a for a, d in zip(call.args, call.in_dims)]
    else:
        key, dynamic = signature_key(call, plan.signature)
        if call.tensor_args and len(dynamic) == len(call.args):  # no tensor defaults
            plan.tensor_keys[quick] = key
    # traced code may read .training, and branch on the grad mode or inference mode (which
    # dynamo cannot read, nor run a program under)
    inference = False if _is_compiling() else torch.is_inference_mode_enabled()
    modes = (torch.is_grad_enabled(), inference)
    full_key = (key, tuple([m.training for m in plan.modules]), modes)
    program = plan.programs.recall(full_key)
    if program is None:
        try:
            program = build_program(call, key)
        except Untraceable as err:
            program = str(err)
        except SyntaxError as err:  # fx wrote code Python cannot read (a keyword named
            # "from", as uniform_(**{"from": -1.0}) passes it): remembered, not built anew
            program = f"fx could not write the program ({type(err).__name__}: {err})"
        plan.programs.remember(full_key, program)
    if not _is_compiling():  # (for explain(); a side effect strict export would warn of)
        plan.last = program
    return program, dynamic, full_key

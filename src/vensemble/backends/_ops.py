"""Batched versions of the tensor functions and methods a member's forward calls.

Inside a traced member forward, a function or method whose inputs carry the member dim runs
in one of four ways: elementwise ops broadcast with the member dim aligned; ops that take
dims (``flatten``, ``view``, ``mean(dim)``, ...) get their dims shifted past the member dim;
shape queries (``size``, ``shape``, ``dim``) answer with the member's logical shape; anything
else runs under ``torch.vmap`` for that one call, which is correct by construction.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
import torch.utils._pytree as pytree
from torch import Tensor, nn

from ._call import autocast_linear
from ._layers import in_member_order, member_order

__all__ = [
    "IN_PLACE_OPERATORS",
    "RANDOM_FUNCTIONS",
    "RANDOM_METHODS",
    "DrawIntoCopies",
    "Elementwise",
    "Expand",
    "IntoMemberCopies",
    "SetItem",
    "make_op",
]

Target = Callable[..., Any] | str

ELEMENTWISE_FUNCTIONS: set[Any] = {
    torch.relu, torch.tanh, torch.sigmoid, torch.exp, torch.log, torch.abs, torch.neg, torch.sqrt,
    torch.rsqrt, torch.square, torch.sin, torch.cos, torch.erf, torch.clamp, torch.clip, torch.add,
    torch.sub, torch.mul, torch.div, torch.pow, torch.maximum, torch.minimum, torch.where,
    torch.log1p, torch.expm1, torch.reciprocal, torch.sign,
    F.relu, F.relu6, F.gelu, F.silu, F.elu, F.celu, F.selu, F.leaky_relu, F.softplus, F.mish,
    F.hardtanh, F.hardswish, F.hardsigmoid, F.logsigmoid, F.softsign, F.tanhshrink, F.sigmoid, F.tanh,
    operator.add, operator.sub, operator.mul, operator.truediv, operator.floordiv, operator.pow,
    operator.neg, operator.pos, operator.abs, operator.gt, operator.lt, operator.ge, operator.le,
    operator.eq, operator.ne, operator.mod, operator.and_, operator.or_, operator.xor,
    operator.invert, operator.lshift, operator.rshift,
}  # fmt: skip

ELEMENTWISE_METHODS = {
    "relu", "tanh", "sigmoid", "exp", "log", "abs", "neg", "sqrt", "rsqrt", "square", "sin", "cos",
    "clamp", "clip", "add", "sub", "mul", "div", "pow", "log1p", "expm1", "reciprocal", "sign",
    "masked_fill", "maximum", "minimum",
}  # fmt: skip

# in-place methods (``name + "_"``) that act per element: on a stacked first argument they
# run as they are, the other tensors aligned to its member dim (the loop's broadcasting)
IN_PLACE_ELEMENTWISE = {
    "add", "sub", "mul", "div", "clamp", "clip", "lerp", "addcmul", "addcdiv", "copy", "fill",
    "zero", "relu", "sigmoid", "tanh", "exp", "neg", "abs", "sqrt", "pow", "masked_fill",
}  # fmt: skip

# ``h += v`` and the like, recorded as in-place operators: per element, into ``h`` itself
IN_PLACE_OPERATORS: frozenset[Any] = frozenset({
    operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv,
    operator.imod, operator.ipow, operator.imatmul, operator.iand, operator.ior, operator.ixor,
    operator.ilshift, operator.irshift,
})  # fmt: skip

PASSTHROUGH_METHODS = {
    "contiguous",
    "detach",
    "clone",
    "float",
    "double",
    "half",
    "bfloat16",
    "to",
    "type_as",
}

RANDOM_FUNCTIONS: set[Any] = {
    torch.rand, torch.randn, torch.randint, torch.rand_like, torch.randn_like, torch.randint_like,
    torch.randperm, torch.bernoulli, torch.multinomial, torch.normal, torch.poisson, F.dropout,
    F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout,
    F.gumbel_softmax, F.rrelu,
}  # fmt: skip

RANDOM_METHODS = {
    "bernoulli",
    "bernoulli_",
    "uniform_",
    "normal_",
    "random_",
    "exponential_",
    "cauchy_",
    "log_normal_",
    "geometric_",
}

_FUNCTION_AS_METHOD: dict[Any, str] = {
    torch.flatten: "flatten", torch.reshape: "reshape", torch.transpose: "transpose",
    torch.swapaxes: "transpose", torch.permute: "permute", torch.unsqueeze: "unsqueeze",
    torch.squeeze: "squeeze", torch.mean: "mean", torch.sum: "sum", torch.amax: "amax",
    torch.amin: "amin", torch.prod: "prod", torch.logsumexp: "logsumexp", torch.softmax: "softmax",
    torch.log_softmax: "log_softmax", torch.cumsum: "cumsum", torch.argmax: "argmax",
    torch.argmin: "argmin", torch.chunk: "chunk", torch.split: "split", torch.unbind: "unbind",
    F.softmax: "softmax", F.log_softmax: "log_softmax",
}  # fmt: skip

_DIM_REDUCTIONS = {
    "mean",
    "sum",
    "amax",
    "amin",
    "prod",
    "logsumexp",
    "softmax",
    "log_softmax",
    "cumsum",
    "argmax",
    "argmin",
    "std",
    "var",
    "max",
    "min",
}


def _shift(d: int) -> int:
    return d + 1 if d >= 0 else d


def _shift_dims(d: Any) -> Any:
    if isinstance(d, int):
        return _shift(d)
    return type(d)(_shift(x) for x in d)


def _sizes(args: tuple[Any, ...]) -> tuple[Any, ...]:
    """``view(2, 3)`` and ``view((2, 3))`` alike: the sizes as one tuple."""
    if len(args) == 1 and isinstance(args[0], (tuple, list, torch.Size)):
        return tuple(args[0])
    return tuple(args)


def _dim_method(name: str, n: int) -> Callable[..., Any] | None:
    """A method that takes dims, applied to a batched ``x`` with the dims shifted, if known."""
    if name == "flatten":
        return lambda x, start_dim=0, end_dim=-1: x.flatten(_shift(start_dim), _shift(end_dim))
    if name in ("view", "reshape"):  # reshape: the stacked layout may differ from the member's

        def view(x: Tensor, *shape: Any, **dtype: Any) -> Tensor:
            if dtype or (len(shape) == 1 and isinstance(shape[0], torch.dtype)):
                return x.view(*shape, **dtype)  # view(torch.int32): the last dim reinterpreted
            return x.reshape(n, *_sizes(shape))

        return view
    if name == "expand":

        def expand(x: Tensor, *shape: Any, size: Any = None) -> Tensor:
            sizes = _sizes(shape) if size is None else tuple(size)
            new = len(sizes) - (x.ndim - 1)  # leading dims the member's expand adds
            if new > 0:  # they go after the member dim, not before it
                x = x.reshape(n, *([1] * new), *x.shape[1:])
            return x.expand(n, *sizes)

        return expand
    if name in ("transpose", "swapaxes", "swapdims"):
        # (torch's keyword names: dim0/dim1, axis0/axis1)
        def transpose(x: Tensor, *dims: int, **names: int) -> Tensor:
            a, b = (*dims, *names.values())
            return x.transpose(_shift(a), _shift(b))

        return transpose
    if name == "permute":

        def permute(x: Tensor, *dims: Any, **names: Any) -> Tensor:
            order = _sizes(dims) if dims else tuple(names["dims"])
            return x.permute(0, *(_shift(d) for d in order))

        return permute
    if name == "unsqueeze":
        return lambda x, dim: x.unsqueeze(_shift(dim))
    if name in ("chunk", "split"):
        # (torch's keyword names: chunks, split_size / split_size_or_sections, dim)
        def pieces(x: Tensor, *args: Any, dim: int = 0, **names: Any) -> Any:
            size, *rest = (*args, *names.values())
            return getattr(x, name)(size, _shift(rest[0] if rest else dim))

        return pieces
    if name == "unbind":
        return lambda x, dim=0: x.unbind(_shift(dim))
    if name == "squeeze":

        def squeeze(x: Tensor, dim: Any = None) -> Tensor:
            if dim is None:
                raise _NeedsVmap
            return x.squeeze(_shift_dims(dim))

        return squeeze
    if name in _DIM_REDUCTIONS:

        def reduce(x: Tensor, *args: Any, **kwargs: Any) -> Any:
            kwargs.pop("_stacklevel", None)  # F.softmax's, recorded by fx; not Tensor.softmax's
            if args and isinstance(args[0], (int, tuple, list)) and not isinstance(args[0], bool):
                args = (_shift_dims(args[0]), *args[1:])
            elif kwargs.get("dim") is not None:
                kwargs = {**kwargs, "dim": _shift_dims(kwargs["dim"])}
            else:
                raise _NeedsVmap  # a full reduction, or max(other): let vmap decide
            return getattr(x, name)(*args, **kwargs)

        return reduce
    return None


class _NeedsVmap(Exception):
    """Raised by a fast handler that cannot handle this particular call."""


class Op(nn.Module):
    """A function or method call of a member's forward, run for all members at once."""

    how = "vmap"

    def __init__(
        self,
        target: Target,
        is_method: bool,
        flags: tuple[bool, ...],
        kwflags: dict[str, bool],
        n: int,
        randomness: str,
    ) -> None:
        super().__init__()
        self.target = target
        self.is_method = is_method
        self.flags = flags
        self.kwflags = kwflags
        self.n = n
        self.randomness = randomness
        self.batched_output = True
        # a function the program calls in this op's place when nothing needs wrapping
        self.direct: Callable[..., Any] | None = None

    def call(self, *args: Any, **kwargs: Any) -> Any:
        if self.is_method:
            assert isinstance(self.target, str)
            return getattr(args[0], self.target)(*args[1:], **kwargs)
        assert callable(self.target)
        return self.target(*args, **kwargs)

    def vmapped(self, *args: Any, **kwargs: Any) -> Any:
        """This call under ``torch.vmap`` over the members, for any op."""
        leaves, spec = pytree.tree_flatten((list(args), kwargs))
        dims: list[int | None] = []
        for k, a in enumerate(args):
            dims += [
                0 if self.flags[k] and isinstance(t, Tensor) else None
                for t in pytree.tree_leaves(a)
            ]
        for key, v in kwargs.items():
            dims += [
                0 if self.kwflags[key] and isinstance(t, Tensor) else None
                for t in pytree.tree_leaves(v)
            ]
        dummy = all(d is None for d in dims)  # a random op on shared inputs still draws per member

        def one(*flat: Any) -> Any:
            a, k = pytree.tree_unflatten(list(flat[: len(leaves)]), spec)
            return self.call(*a, **k)

        in_dims = (*dims, 0) if dummy else tuple(dims)
        extra = (torch.empty(self.n),) if dummy else ()
        device = next((t.device for t in leaves if isinstance(t, Tensor)), None)
        with autocast_linear(device):  # (F.linear under autocast, as a member alone)
            return torch.vmap(one, in_dims=in_dims, randomness=self.randomness)(*leaves, *extra)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.vmapped(*args, **kwargs)


class Elementwise(Op):
    how = "fused: elementwise, member dim aligned"

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        ranks = [t.ndim - f for t, f in zip(args, self.flags) if isinstance(t, Tensor)]
        ranks += [v.ndim - self.kwflags[k] for k, v in kwargs.items() if isinstance(v, Tensor)]
        top = max(ranks, default=0)

        def align(t: Any, batched: bool) -> Any:
            if batched and isinstance(t, Tensor) and t.ndim - 1 < top:
                return t.view(t.shape[0], *([1] * (top - t.ndim + 1)), *t.shape[1:])
            return t

        args = tuple(align(a, f) for a, f in zip(args, self.flags))
        kwargs = {k: align(v, self.kwflags[k]) for k, v in kwargs.items()}
        return self.call(*args, **kwargs)


class _FillPerMember(Elementwise):
    """``fill_(value)`` / ``masked_fill_(mask, value)`` on a stacked tensor with each member's
    own 0-d value (a buffer): torch takes a 0-d value only, so the aligned values are
    written with ``copy_`` (of ``where`` for the masked fill)."""

    how = "fused: per-member fill values aligned, written in place"

    def call(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        if self.target == "fill_":
            value = args[0] if args else kwargs["value"]
            return x.copy_(torch.as_tensor(value).expand_as(x))
        mask = args[0] if args else kwargs["mask"]
        value = args[1] if len(args) > 1 else kwargs["value"]
        return x.copy_(torch.where(mask, value, x))


def _member_copies(x: Tensor, n: int) -> Tensor:
    """``x`` (the same for every member) as ``n`` copies of its own, ``(n, *x.shape)``."""
    return x.unsqueeze(0).expand(n, *x.shape).clone()


class IntoMemberCopies(Elementwise):
    """An augmented assignment (``out += v``) into a value the forward made, the same for
    every member, with a per-member right side: each member's value is its own tensor, so it
    is copied per member first (the caller makes sure nothing else refers to it), then
    written in place, with the in-place op's rules (its dtype kept, its shape not broadcast)."""

    how = "fused: the shared value copied per member, then written in place"

    def forward(self, left: Any, *args: Any, _sources: Any = (), **kwargs: Any) -> Any:
        """``_sources``: where ``left`` is a conversion, what it converted: if it returned
        one of them itself (no copy), the write must reach that shared tensor once per
        member, as the loop's does: this path refuses (the fallback decides)."""
        if isinstance(left, Tensor):
            storage = left.untyped_storage().data_ptr()
            if any(
                isinstance(t, Tensor) and t.untyped_storage().data_ptr() == storage
                for t in _sources
            ):
                raise RuntimeError(
                    "an augmented assignment with a per-member value into a shared tensor "
                    "(a conversion returned its input itself)"
                )
            left = _member_copies(left, self.n)
        return super().forward(left, *args, **kwargs)


class _MemoryFormat(Op):
    """``to(..., memory_format=f)`` and ``contiguous(memory_format=f)``: what each member's
    call returns, its input itself or a copy laid out in ``f``. (On the stacked tensor, one
    dim more, torch would decide differently: ``to`` never copies a 5-d tensor for
    ``contiguous_format``, and ``contiguous`` refuses ``channels_last``.) Member 0's call
    decides; a member's slices are laid out alike."""

    how = "fused: the member's memory format, member by member's layout"

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        member = x[0]
        theirs = self.call(member, *args, **kwargs)
        if theirs.data_ptr() == member.data_ptr() and theirs.dtype == member.dtype:
            return x  # the member's call returned its input (or a view of the same memory)
        rest = {k: v for k, v in kwargs.items() if k != "memory_format"}
        y = x.to(*args, **rest) if self.target == "to" else x
        y = in_member_order(y, member_order(theirs))
        return y.clone() if y.data_ptr() == x.data_ptr() else y  # a copy, as the member's


class _DimMethod(Op):
    how = "fused: dims shifted past the member dim"

    def __init__(self, name: str, *rest: Any) -> None:
        super().__init__(name, True, *rest)
        handler = _dim_method(name, self.n)
        assert handler is not None
        self.handler = handler
        # a reduction over dims (or softmax, cumsum): new memory, whatever the input's layout
        self.reduces = name in _DIM_REDUCTIONS

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return self.handler(*args, **kwargs)
        except _NeedsVmap:
            return self.vmapped(*args, **kwargs)


class _Logical(Op):
    """Shape queries of a batched tensor answer with the member's shape."""

    how = "fused: the member's logical shape"

    def __init__(self, *rest: Any) -> None:
        super().__init__(*rest)
        self.batched_output = False

    def forward(self, x: Any, *args: Any, **kwargs: Any) -> Any:
        name = self.target if self.is_method else args[0]
        if name == "size":
            dim = args[0] if args else kwargs.get("dim")
            return x.shape[1:] if dim is None else x.shape[1:][dim]
        if name == "shape":
            return x.shape[1:]
        if name in ("dim", "ndimension", "ndim"):
            return x.ndim - 1
        if name == "numel":
            return x.numel() // self.n
        return getattr(x, str(name))  # dtype, device, requires_grad, is_cuda, ...


class _Getitem(Op):
    how = "fused: indexing past the member dim"

    def forward(self, x: Any, index: Any) -> Any:
        if not isinstance(x, Tensor):
            return x[index]  # a container of batched values
        idx = index if isinstance(index, tuple) else (index,)
        if all(isinstance(i, (int, slice)) for i in idx):
            return x[(slice(None), *idx)]
        if idx and idx[0] is Ellipsis and all(isinstance(i, (int, slice)) for i in idx[1:]):
            return x[index]
        return self.vmapped(x, index)


class SetItem(Op):
    """``h[index] = value`` into a per-member ``h``: written past the member dim, in place (the
    program's later reads of ``h`` see it, as the member's do). ``index``: ints, slices,
    ``...``, ``None`` and at most one tensor, the same for every member; ``value``: shared,
    or per member (aligned to the member dim). Or a per-member boolean mask with one value
    for all (``h[h > 1] = 1.0``). Anything else raises (the fallback runs it)."""

    how = "fused: written in place past the member dim"

    def __init__(self, *args: Any, into_copies: bool = False) -> None:
        super().__init__(*args)
        # ``x`` is a value the forward made, the same for every member (out = x.new_zeros(...);
        # out[:, :4] = h): copied per member first, and the copies returned (the program's
        # later reads of ``x`` read them); the caller makes sure nothing aliases ``x``
        self.into_copies = into_copies
        self.batched_output = into_copies  # (else None: the write is in ``x``)
        if into_copies:
            self.how = "fused: the shared value copied per member, then written in place"

    def forward(self, x: Tensor, index: Any, value: Any) -> Tensor | None:
        if self.into_copies:
            x = _member_copies(x, self.n)
        self._write(x, index, value)
        return x if self.into_copies else None

    def _write(self, x: Tensor, index: Any, value: Any) -> None:
        if self.flags[1]:  # a per-member index: a mask (h[h > 1] = 1.0), one value for all
            mask = isinstance(index, Tensor) and index.dtype == torch.bool
            one = not self.flags[2] and (not isinstance(value, Tensor) or value.ndim == 0)
            if not (mask and one):
                raise RuntimeError("item assignment with a per-member index")
            x[index] = value  # (the stacked mask picks each member's own elements)
            return
        idx = index if isinstance(index, tuple) else (index,)
        advanced = [k for k, i in enumerate(idx) if not _basic_index(i)]
        where: tuple[Any, ...] = (slice(None), *idx)
        if advanced and advanced != list(range(advanced[0], advanced[-1] + 1)):
            # advanced indices apart (h[[0, 1], :, [1, 2]]): torch puts their dims first, so
            # the member dim must be one of them, in front (a leading slice would come after
            # them). (torch.vmap gets this case wrong: the members' values land crosswise.)
            if any(isinstance(idx[k], Tensor) and idx[k].dtype == torch.bool for k in advanced):
                raise RuntimeError("item assignment with a mask and advanced indices apart")
            dims = len(torch.broadcast_shapes(*(torch.as_tensor(idx[k]).shape for k in advanced)))
            members = torch.arange(x.shape[0], device=x.device).view(-1, *([1] * dims))
            where = (members, *idx)
        if self.flags[2] and isinstance(value, Tensor):
            rank = x[0][index].ndim  # (member 0's slice: what value broadcasts against)
            if value.ndim - 1 < rank:
                value = value.view(
                    value.shape[0], *([1] * (rank - value.ndim + 1)), *value.shape[1:]
                )
            elif value.ndim - 1 > rank and all(d == 1 for d in value.shape[1 : value.ndim - rank]):
                value = value.reshape(value.shape[0], *value.shape[value.ndim - rank :])
        x[where] = value


def _basic_index(i: Any) -> bool:
    """An index entry that keeps its dims where they are (an int, a slice, ``...``, ``None``)."""
    return i is None or i is Ellipsis or isinstance(i, slice) or type(i) is int


class DrawIntoCopies(Op):
    """``t.normal_()`` (an in-place draw) into a value the forward made, the same for every
    member (``x.new_empty(x.shape).normal_()``), under ``randomness="different"``: copied per
    member first, then drawn into, so each member's draws are its own; the copies are returned
    (the program's later reads of ``t`` read them). The caller makes sure nothing aliases ``t``."""

    how = "fused: the shared value copied per member, then drawn into"

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        x = _member_copies(x, self.n)
        assert isinstance(self.target, str)
        getattr(x, self.target)(*args, **kwargs)
        return x


class _Concat(Op):
    how = "fused: concatenation past the member dim"

    def forward(self, tensors: Any, dim: int = 0) -> Any:
        if not isinstance(dim, int):
            return self.vmapped(tensors, dim)
        return self.call(list(tensors), _shift(dim))


class Expand(nn.Module):
    """Give a value that is the same for every member the member dim (a broadcast view)."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.n = n

    def forward(self, x: Any) -> Any:
        return pytree.tree_map_only(Tensor, lambda t: t.unsqueeze(0).expand(self.n, *t.shape), x)


_SHAPE_ATTRS = {"shape", "ndim", "dtype", "device", "requires_grad", "is_cuda", "layout"}


def make_op(
    target: Target,
    is_method: bool,
    flags: tuple[bool, ...],
    kwflags: dict[str, bool],
    n: int,
    randomness: str,
    attr: Any = None,
) -> Op:
    """The wrapper that runs one function/method call of the member's forward for all members.

    Args:
        target: the function, or the method name.
        is_method: ``target`` is a method of the first argument.
        flags: whether each positional argument carries the member dim.
        kwflags: the same for keyword arguments.
        n: number of members.
        randomness: the ensemble's randomness mode.
        attr: for ``getattr`` calls, the attribute name.
    """
    rest = (flags, kwflags, n, randomness)
    first_only = bool(flags) and flags[0] and not any(flags[1:]) and not any(kwflags.values())
    name = target if is_method else _FUNCTION_AS_METHOD.get(target)
    random = (target in RANDOM_METHODS) if is_method else (target in RANDOM_FUNCTIONS)
    if random:
        if randomness == "different" and target is F.dropout and first_only:
            return Elementwise(target, is_method, *rest)
        return Op(target, is_method, *rest)
    if not is_method and target in IN_PLACE_OPERATORS:  # h += 1 (see fused._AUGMENTED)
        if flags and flags[0] and target is not operator.imatmul:
            return Elementwise(target, is_method, *rest)  # into the stacked tensor itself
        return Op(target, is_method, *rest)  # vmap knows the rules (and raises where needed)
    if is_method and isinstance(target, str) and target.endswith("_"):
        value_at = {"fill_": 1, "masked_fill_": 2}.get(target)  # takes a 0-d value only
        per_member_value = value_at is not None and (
            (len(flags) > value_at and flags[value_at]) or kwflags.get("value", False)
        )
        if flags and flags[0] and per_member_value:
            return _FillPerMember(target, is_method, *rest)
        if flags and flags[0] and target[:-1] in IN_PLACE_ELEMENTWISE:
            # into the stacked tensor itself, the others aligned (an EMA updated in forward)
            return Elementwise(target, is_method, *rest)
        return Op(target, is_method, *rest)  # in-place: vmap knows the rules
    if first_only and name in ("to", "contiguous") and "memory_format" in kwflags:
        return _MemoryFormat(name, True, *rest)
    if first_only and isinstance(name, str):
        if name in ("size", "dim", "ndimension", "numel"):
            return _Logical(name, True, *rest)
        if name in PASSTHROUGH_METHODS:
            return Elementwise(name, True, *rest)
        if _dim_method(name, n) is not None:
            return _DimMethod(name, *rest)
    if not is_method and target is getattr and first_only and attr in _SHAPE_ATTRS:
        return _Logical(target, False, *rest)
    if not is_method and target is operator.getitem and flags and flags[0] and not any(flags[1:]):
        return _Getitem(target, False, *rest)
    if not is_method and target is operator.setitem and flags[0]:
        return SetItem(target, False, *rest)
    if (
        not is_method
        and target in (torch.cat, torch.concat, torch.stack)
        and flags
        and not any(flags[1:])
        and not any(kwflags.values())
    ):
        return _Concat(target, False, *rest) if flags[0] else Op(target, False, *rest)
    if (is_method and target in ELEMENTWISE_METHODS) or (
        not is_method and target in ELEMENTWISE_FUNCTIONS
    ):
        return Elementwise(target, is_method, *rest)
    return Op(target, is_method, *rest)

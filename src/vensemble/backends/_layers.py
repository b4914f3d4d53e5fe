"""Batched implementations of the layers people stack, one call for all members.

Each wrapper runs one layer of the stacked template (``orig``, whose tensors carry a leading
member dim ``N``) on activations that carry the member dim first (``batched``) or are the
same for every member (unbatched). They compute what the member's layer computes, member by
member; ``tests/test_fused.py`` checks each against the loop, forward and backward.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .._layout import in_major
from ._autotune import autotune, decide, running_aside_allowed

_is_compiling = torch.compiler.is_compiling  # one lookup fewer per call (dynamo knows it)


# torch.jit.is_tracing without its Python frame; not traceable by dynamo: ask _is_compiling first
_jit_tracing = torch._C._is_tracing


# The number FusedProgram gives the input signature of the compile=True call in progress (its
# eager settling call, then its compiled calls); None otherwise. Under torch.compile a layer
# reads the layout its eager call learned by this number (a guard on an int), not by a key
# built from the compiled tensors' strides, which can differ from eager ones on a size-1 dim.
PROGRAM_SIGNATURE: list[int | None] = [None]


def sizes(t: Tensor) -> tuple[int, ...]:
    """``t``'s shape as ints, for a key: under ``torch.jit.trace`` sizes are 0-d tensors,
    which hash by identity (a key with them never matches what was learned before)."""
    if _is_compiling() or not _jit_tracing():  # (dynamo cannot trace the second)
        return tuple(t.shape)
    with warnings.catch_warnings():  # (the trace is specialised to these sizes anyway)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        return tuple(int(d) for d in t.shape)


def _is_tracing() -> bool:
    """Under ``torch.compile`` or ``torch.jit.trace``: no eager-only shortcut then (cached
    operand views, the no-autograd program), which a trace would record as constants."""
    return _is_compiling() or _jit_tracing()


__all__ = [
    "FRESH_OUTPUT",
    "FUSED_LAYERS",
    "LAYOUT_BLIND",
    "LAYOUT_FOLLOWS_INPUT",
    "PARAM_FREE_ELEMENTWISE",
    "PROGRAM_SIGNATURE",
    "READS_ANY_LAYOUT",
    "ConvBatchNorm",
    "Fused",
    "batchnorm_affine",
    "fold_batchnorm",
    "foldable_batchnorm",
    "fused_layer_for",
    "in_member_order",
    "member_order",
]


def _bview(t: Tensor, ndim: int, channel_dim: int | None = None) -> Tensor:
    """View a per-member tensor ``(N, *s)`` to broadcast against a batched ``ndim``-dim activation.

    With ``channel_dim`` (a dim of the activation) ``s`` must be one dim that lands there;
    without it, ``s`` lines up with the activation's trailing dims.
    """
    n = t.shape[0]
    if channel_dim is not None:
        shape = [n] + [1] * (ndim - 1)
        shape[channel_dim] = t.shape[1]
        return t.view(shape)
    return t.view(n, *([1] * (ndim - t.ndim)), *t.shape[1:])


def member_order(t: Tensor) -> tuple[int, ...] | None:
    """The dims of a member's tensor ``t`` from outermost to innermost in memory; ``None``
    when ``t`` is contiguous (channels-last gives ``(0, 2, 3, 1)``)."""
    if t.is_contiguous():
        return None
    strides = t.stride()
    return tuple(sorted(range(t.ndim), key=lambda d: (-strides[d], d)))


def in_member_order(y: Tensor, order: tuple[int, ...] | None) -> Tensor:
    """Stacked ``y`` ``(N, *s)`` with each member's slice dense and laid out in ``order`` (see
    :func:`member_order`), as the member's own result is: a copy only where it is not."""
    if order is None:
        return y.contiguous()
    outer = (0, *(d + 1 for d in order))
    inverse = [0] * len(outer)
    for position, d in enumerate(outer):
        inverse[d] = position
    return y.permute(outer).contiguous().permute(inverse)


def settled(t: Tensor) -> Tensor:
    """``t`` as the eager program would hold it, where a compiled one may differ: the stride
    of a size-1 dim (which moves no element, but torch's layout rules read it: a compiled
    batch of 1 can carry a stride there that makes pooling pick another layout). Under
    ``torch.compile`` each size-1 dim gets the stride a dense tensor gives it, the span of
    the dims after it (a view: no copy); eager tensors are returned as they are."""
    if not _is_compiling() or t.ndim < 2 or 1 not in t.shape:
        return t
    shape, stride = t.shape, list(t.stride())
    for d in range(t.ndim):
        if shape[d] == 1:
            span = 1  # (a plain loop: dynamo does not take max(..., default=))
            for r in range(d + 1, t.ndim):
                if shape[r] != 1 and stride[r] * shape[r] > span:
                    span = stride[r] * shape[r]
            stride[d] = span
    return t.as_strided(shape, stride)


class Fused(nn.Module):
    """Base of the batched layer wrappers.

    Args:
        orig: the stacked template's layer (its tensors have a leading member dim).
        n: number of members.
        batched: whether each positional input carries the member dim first.
        randomness: the ensemble's randomness mode (``"different"``, ``"same"``, ``"error"``).
    """

    how = "fused"

    def __init__(self, orig: nn.Module, n: int, batched: tuple[bool, ...], randomness: str) -> None:
        super().__init__()
        object.__setattr__(self, "orig", orig)  # not a child: the template owns it
        self.n = n
        self.batched = batched
        self.randomness = randomness

    orig: Any  # the template's layer, typed loosely: each subclass knows its layer's fields

    # Whether nothing downstream could tell this layer's output layout from the member's (a
    # view, a reshape or ``contiguous`` of it would: see fused.py's ``mark_unseen_layouts``,
    # which sets it when the program is built). Only then may a Linear or a convolution return
    # the transposed view its batched kernel computes (a narrow Linear by columns, out-major
    # weights, a grouped or concatenated conv); else its output is contiguous, as the
    # member's is.
    layout_unseen = False

    # The layout of a member's result, learned per input shape and layout (``member_layout``)
    _orders: dict[tuple[Any, ...], tuple[int, ...] | None] | None = None
    # ... and per compiled program input signature (see ``PROGRAM_SIGNATURE``)
    _orders_by_signature: dict[tuple[Any, ...], tuple[int, ...] | None] | None = None
    # Whether the layer's input is one of the program's own (a placeholder): its strides are
    # the caller's tensor's, under torch.compile too, so ``settled`` must leave them alone
    reads_program_input = False

    def member_input(self, x0: Tensor) -> Tensor:
        """Member 0's input as the eager program holds it (see :func:`settled`)."""
        return x0 if self.reads_program_input else settled(x0)

    def member_layout(
        self, key: tuple[Any, ...], member_result: Callable[[], Tensor]
    ) -> tuple[tuple[int, ...] | None, bool]:
        """The memory order of a member's result for ``key`` (see :func:`member_order`), and
        whether it is known: ``member_result()`` computes member 0's (once per key, without
        autograd). Not where nothing may run beside the program (a trace, a fake tensor: see
        ``running_aside_allowed``) and nothing was learned before: then unknown. (Under
        deterministic algorithms too: a layout is a fact, not a timing; and under
        torch.compile, where it is learned eagerly.)"""
        signature = PROGRAM_SIGNATURE[0]
        by_signature = self._orders_by_signature
        # the key's first two entries are the input's sizes and strides, which the signature
        # stands for; the rest (the weights' strides: a state dict loaded with assign=True can
        # change them) is checked as it is
        here = None if signature is None else (signature, key[2:])
        if (
            _is_compiling()
            and here is not None
            and by_signature is not None
            and here in by_signature
        ):  # what the eager call of this input signature learned
            return by_signature[here], True
        orders = self._orders
        if orders is None:
            orders = self._orders = {}
        if key in orders:
            order = orders[key]
        elif not running_aside_allowed():
            return None, False
        else:
            order = _learn_order(orders, key, member_result)
        if here is not None and not _is_compiling():
            if by_signature is None:
                by_signature = self._orders_by_signature = {}
            by_signature[here] = order
        return order, True

    def release_views(self) -> None:
        """Drop whatever this layer caches that refers to the parameters (nothing here)."""

    def expand(self, x: Tensor) -> Tensor:
        """The member-batched form of ``x`` (a view when ``x`` is unbatched)."""
        return x if self.batched[0] else x.unsqueeze(0).expand(self.n, *x.shape)


# Outputs per row at or below which the batched Linear, without autograd, also measures
# y^T = W x^T (the GEMM's result laid out (N, out, rows), returned as its transposed view)
# against y = x W^T: BLAS fills a narrow row-major result slowly. On a 2-core Xeon, 2 threads:
# 10 x 64 x 128 -> 10 took 26 us against 69, 100 x 32 x 64 -> 1 35 against 98, 32 x 256 x
# 256 -> 10 379 against 1560. Wider layers were slower that way (784 -> 128: 8%), so they are
# not offered it; nor are layers with no more rows than outputs (a batch of 1: the same GEMV
# either way, and the measurement only noise), nor a forward autograd records: whole training
# steps took 0-7% longer (32 x MLP 32-64-64-10: 1.82 against 1.70 ms), the backward losing
# what the forward gained.
NARROW_OUTPUTS = 16


def _records(*tensors: Tensor | None) -> bool:
    """Whether autograd records an op on these tensors."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


_LINEAR_HOW = (
    "fused: baddbmm over the members' in-major weights (one output: bmm, bias added in place)"
)


class _Linear(Fused):
    # Without autograd, the operand views of the last call, reused while the parameters are the
    # same objects on the same storage (views share it, so in-place updates show through): two
    # dispatcher calls fewer per layer, which is most of what a small layer costs on a GPU.
    # (weight, its data_ptr, bias, its data_ptr, W^T, bias (N, 1, out), whether baddbmm runs it)
    _views: tuple[Tensor, int, Tensor | None, int, Tensor, Tensor | None, bool] | None = None

    # The orientation measured for each (rows, input strides, dtype, device) of a narrow
    # layer: True when y^T = W x^T won (see NARROW_OUTPUTS)
    _columns: dict[tuple[Any, ...], bool] | None = None

    @property
    def how(self) -> str:  # type: ignore[override]  # computed: the base class's is a string
        """What runs the layer, naming the row counts that go by columns."""
        rows = sorted({here[0] for here, by_columns in (self._columns or {}).items() if by_columns})
        if not rows or torch.are_deterministic_algorithms_enabled():  # (then never by columns)
            return _LINEAR_HOW
        return f"{_LINEAR_HOW}; y^T = W x^T for {', '.join(map(str, rows))} rows (narrow, measured)"

    def release_views(self) -> None:
        self._views = None

    def _cached_views(self, w: Tensor, b: Tensor | None) -> tuple[Any, ...] | None:
        """``_views`` while they still show ``w`` and ``b`` (same tensors, same storage)."""
        c = self._views
        if (
            c is None
            or c[0] is not w
            or c[2] is not b
            or c[1] != w.data_ptr()
            or (b is not None and c[3] != b.data_ptr())
        ):
            return None
        return c

    def _operands(
        self, w: Tensor, b: Tensor | None, cache: bool
    ) -> tuple[Tensor, Tensor | None] | None:
        """``(W^T (N, in, out) contiguous, bias (N, 1, out))``; ``None`` for out-major weights.

        ``cache``: reuse and keep the views (only without autograd, and never under
        torch.compile, where the views are free and the cache a side effect dynamo would guard).
        """
        c = self._cached_views(w, b) if cache else None
        if c is not None:
            return c[4], c[5]
        if not in_major(w):
            return None
        n, out_f, in_f = w.shape
        # one output: W^T's size-1 dim gets the canonical stride (BLAS takes a slower path
        # for (in, 1) with a stride of ``in`` on the 1: 10-20% on a 64 -> 1 head)
        wt = w.mT if out_f != 1 else w.view(n, in_f, 1)
        bu = None if b is None else b.unsqueeze(1)
        if cache:
            b_ptr = 0 if b is None else b.data_ptr()
            inline = bu is not None and out_f > NARROW_OUTPUTS  # forward_no_grad's short cut
            self._views = (w, w.data_ptr(), b, b_ptr, wt, bu, inline)
        return wt, bu

    def forward(self, x: Tensor) -> Tensor:
        params = self.orig._parameters
        w, b = params["weight"], params["bias"]  # (N, out, in), (N, out)
        compiling = _is_compiling()
        cache = not (compiling or torch.is_grad_enabled() or _jit_tracing())
        operands = self._operands(w, b, cache=cache)
        if operands is None:
            return self._out_major(x, w, b)
        return self._batched_linear(x, *operands, compiling)

    def forward_no_grad(self, x: Tensor) -> Tensor:
        """``forward`` in eager mode without autograd (the caller knows): the cached operand
        views straight away while the parameters are the same tensors on the same storage."""
        params = self.orig._parameters
        c = self._cached_views(params["weight"], params["bias"])
        if c is None:
            return self.forward(x)
        bu = c[5]
        if c[6] and bu is not None:  # the common shapes inline: one Python frame fewer
            ndim, batched = x.ndim, self.batched[0]
            if ndim == 3 and batched:
                return torch.baddbmm(bu, x, c[4])
            if ndim == 2 and not batched:
                return torch.baddbmm(bu, x.expand(self.n, -1, -1), c[4])
        return self._batched_linear(x, c[4], bu, False)

    def _batched_linear(self, x: Tensor, wt: Tensor, bu: Tensor | None, compiling: bool) -> Tensor:
        """``y = x @ W^T + b`` with ``wt`` = W^T ``(N, in, out)`` contiguous (hand-batched
        code's layout) and ``bu`` the bias ``(N, 1, out)``."""
        # (N, B, in) for the GEMM; the common shapes first: the per-call Python of a layer is
        # much of what a small ensemble costs (one reshape fewer: ~1 us of ~5 per layer)
        ndim = x.ndim
        lead = None  # the dims between the member dim and the features, when not just B
        if self.batched[0]:
            x3 = x
            if ndim != 3:
                lead = x.shape[1:-1]
                x3 = x.reshape(self.n, -1, x.shape[-1])
        elif ndim == 2:
            x3 = x.expand(self.n, -1, -1)
        else:
            lead = x.shape[:-1]
            x3 = x.reshape(1, -1, x.shape[-1]).expand(self.n, -1, -1)
        if compiling:
            # matmul + add, as vmap's graph has them: inductor fuses the bias (and what follows)
            # into its own kernels for small layers, where an extern baddbmm would stay opaque
            y = torch.matmul(x3, wt)
            y = y if bu is None else y + bu
        elif (
            self.layout_unseen
            and wt.shape[2] <= NARROW_OUTPUTS
            and x3.shape[1] > wt.shape[2]  # more rows than outputs: else nothing to gain
            and not _records(x3, wt, bu)
            and self._in_columns(x3, wt, bu)
        ):
            y = self._by_columns(x3, wt, bu)
        else:
            y = self._by_rows(x3, wt, bu)
        return y if lead is None else y.reshape(self.n, *lead, wt.shape[2])

    @staticmethod
    def _by_rows(x3: Tensor, wt: Tensor, bu: Tensor | None) -> Tensor:
        """``x3 @ wt + bu``, the result ``(N, rows, out)`` contiguous."""
        if bu is None:
            return torch.bmm(x3, wt)
        if wt.shape[2] == 1:
            # one output per row, where BLAS's beta path is slow: bmm, then the bias added in
            # place (1000 x 128 x 32 -> 1: 0.64 vs 0.94 ms)
            return torch.bmm(x3, wt).add_(bu)
        # baddbmm: the bias copied into the output, then the GEMM adds to it (10 x 64 x
        # 128 -> 10: 16% faster than bmm + add_; within 3% either way on wider layers)
        return torch.baddbmm(bu, x3, wt)

    @staticmethod
    def _by_columns(x3: Tensor, wt: Tensor, bu: Tensor | None) -> Tensor:
        """The same values as :meth:`_by_rows`, computed as ``(wt^T x3^T + bu^T)^T``: the GEMM
        writes ``(N, out, rows)`` and the result is its transposed view."""
        if bu is None:
            return torch.bmm(wt.mT, x3.mT).mT
        return torch.baddbmm(bu.mT, wt.mT, x3.mT).mT

    def _in_columns(self, x3: Tensor, wt: Tensor, bu: Tensor | None) -> bool:
        """Whether :meth:`_by_columns` runs this narrow layer for ``x3``'s shape, layout, dtype
        and device: measured once per layer and shape. A fixed ``False`` under deterministic
        algorithms, so results do not depend on a timing, and where nothing may be measured
        (a trace, a fake tensor: see ``measuring_allowed``) and nothing was measured before."""
        memo = self._columns
        if memo is None:
            memo = self._columns = {}
        # the input's layout too: shared (stride 0), or a columns layer's transposed output
        here = (sizes(x3)[1], x3.stride(), x3.dtype, x3.device)

        def measure() -> bool:
            n, in_f, out_f = wt.shape
            key = ("linear-rows-or-columns", n, in_f, out_f, bu is None, *here)
            candidates = {
                "rows": lambda: self._by_rows(x3, wt, bu),
                "columns": lambda: self._by_columns(x3, wt, bu),
            }
            return autotune(key, candidates, x3.device) == "columns"

        return decide(here, memo, measure, False)

    def _out_major(self, x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
        """Weights in the member's own ``(out, in)`` layout (tied or parametrized ones): the
        result comes as a transposed view, made contiguous unless the layout is unseen."""
        y = self._out_major_transposed(x, w, b)
        return y if self.layout_unseen else y.contiguous()

    def _out_major_transposed(self, x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
        n, out_f, in_f = w.shape
        if self.batched[0]:
            # y^T = W x^T: with W in the member's own (out, in) layout both bmm operands are
            # contiguous whenever x came out of a previous layer in this transposed layout
            xt = x.reshape(n, -1, in_f).transpose(1, 2)  # (N, in, M)
            yt = torch.bmm(w, xt) if b is None else torch.baddbmm(b.unsqueeze(2), w, xt)
            y = yt.transpose(1, 2)  # (N, M, out), a view of the (N, out, M) result
            return y if x.ndim == 3 else y.reshape(n, *x.shape[1:-1], out_f)
        x2 = x.reshape(-1, in_f)  # (M, in)
        rows = x2.shape[0]

        def wide() -> Tensor:
            flat = w.reshape(n * out_f, in_f)
            y = x2 @ flat.t() if b is None else torch.addmm(b.reshape(-1), x2, flat.t())
            return y.view(rows, n, out_f).transpose(0, 1)  # (N, M, out)

        def bmm() -> Tensor:
            xt = x2.t().expand(n, in_f, rows)  # (N, in, M), one copy of x for all
            yt = torch.bmm(w, xt) if b is None else torch.baddbmm(b.unsqueeze(2), w, xt)
            return yt.transpose(1, 2)  # (N, M, out)

        cands = {"wide": wide, "bmm": bmm}
        sn, sout, sin = sizes(w)
        key = ("linear-shared", sn, sizes(x2)[0], sin, sout, b is None, x.dtype, x.device)
        y = cands[autotune(key, cands, x.device)]()
        return y if x.ndim == 2 else y.reshape(n, *x.shape[:-1], out_f)


_CONV_HOW = (
    "fused: per-member loop, grouped conv or concatenated conv, by measurement (the first "
    "under deterministic algorithms)"
)


class _Conv(Fused):
    _kernel: str | None = None  # the candidate the last eager call ran

    @property
    def how(self) -> str:  # type: ignore[override]  # computed: the base class's is a string
        """What runs the layer, naming the kernel the last call took."""
        return _CONV_HOW if self._kernel is None else f"{_CONV_HOW}; last call: {self._kernel}"

    def forward(self, x: Tensor) -> Tensor:
        return self.run(x, self.orig.weight, self.orig.bias)

    def run(self, x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
        """The convolution with stacked weights ``w`` ``(N, O, C/g, *k)`` and bias ``b``
        ``(N, O)``: the layer's own, or ones a following BatchNorm was folded into."""
        m = self.orig
        n, out_c = w.shape[0], w.shape[1]
        spatial = w.ndim - 3
        conv: Callable[..., Tensor] = getattr(F, f"conv{spatial}d")
        batched = self.batched[0]
        full = x.ndim - batched == spatial + 2  # has a batch dim

        def loop() -> Tensor:
            return torch.stack(
                [
                    m._conv_forward(x[i] if batched else x, w[i], None if b is None else b[i])
                    for i in range(n)
                ]
            )

        cands: dict[str, Callable[[], Tensor]] = {}  # in order of preference (see autotune)
        if m.padding_mode == "zeros" and full:
            args = (m.stride, m.padding, m.dilation)
            bias = None if b is None else b.reshape(-1)
            kernel = w.reshape(n * out_c, *w.shape[2:])
            if not batched and m.groups == 1:

                def concat() -> Tensor:
                    y = conv(x, kernel, bias, *args, 1)  # (B, N*O, *s)
                    return y.view(y.shape[0], n, out_c, *y.shape[2:]).transpose(0, 1)

                cands["concat"] = concat
            else:

                def grouped() -> Tensor:
                    xb = self.expand(x)  # (N, B, C, *s)
                    xg = xb.transpose(0, 1).reshape(xb.shape[1], -1, *xb.shape[3:])  # (B, N*C, *s)
                    y = conv(xg, kernel, bias, *args, n * m.groups)
                    return y.view(y.shape[0], n, out_c, *y.shape[2:]).transpose(0, 1)

                cands["grouped"] = grouped
        cands["loop"] = loop
        key: tuple[Any, ...] = (
            "conv",
            sizes(x),
            batched,
            sizes(w),
            m.stride,
            m.padding,
            m.groups,
            x.dtype,
            x.device,
        )
        if not self.layout_unseen:  # each kernel's result laid out as the member's (timed too)
            order = self._member_order(x, w, b, batched)
            cands = {k: functools.partial(_laid_out, f, order) for k, f in cands.items()}
            key = (*key, "laid out", order)
        chosen = autotune(key, cands, x.device)
        if not _is_compiling():  # (a side effect dynamo would trace)
            object.__setattr__(self, "_kernel", chosen)
        return cands[chosen]()  # grouped, concat: transposed views

    def _member_order(
        self, x: Tensor, w: Tensor, b: Tensor | None, batched: bool
    ) -> tuple[int, ...] | None:
        """The memory order of a member's result (channels-last for a channels-last input,
        or for channels-last weights, on the CPU), learned from member 0's; contiguous where
        it cannot be learned (see ``Fused.member_layout``)."""
        x0 = self.member_input(x[0] if batched else x)
        key = (sizes(x0), x0.stride(), sizes(w)[1:], w.stride()[1:], x.dtype, x.device)
        bias = None if b is None else b[0]
        return self.member_layout(key, lambda: self.orig._conv_forward(x0, w[0], bias))[0]


# Learned eagerly even when the call comes from inside torch.compile (as autotune measures):
# dynamo's fake tensors carry the strides of torch's meta kernels, which need not be the
# CPU kernels' (a conv with channels-last weights on a contiguous input)
@torch.compiler.disable
def _learn_order(
    orders: dict[tuple[Any, ...], tuple[int, ...] | None],
    key: tuple[Any, ...],
    member_result: Callable[[], Tensor],
) -> tuple[int, ...] | None:
    with torch.no_grad():
        order = orders[key] = member_order(member_result())
    return order


def _laid_out(kernel: Callable[[], Tensor], order: tuple[int, ...] | None) -> Tensor:
    return in_member_order(kernel(), order)


_BATCHNORM_DIMS = {nn.BatchNorm1d: (2, 3), nn.BatchNorm2d: (4,), nn.BatchNorm3d: (5,)}


def foldable_batchnorm(w: Tensor, bn: Any) -> bool:
    """Whether BatchNorm ``bn`` may be folded into the conv weight ``w`` now: eval mode with
    running statistics, no autograd or autocast, one float32/float64 dtype (folding in a lower
    precision, or across two, rounds differently from the loop), and as many statistics as
    the conv has output channels (a mismatch must raise as the loop does, not broadcast).
    ``w`` and the statistics both carry a leading member dim, or neither does."""
    var = bn.running_var
    if bn.training or bn.running_mean is None or var is None:
        return False
    dtype = w.dtype
    return (
        dtype in (torch.float32, torch.float64)
        and var.dtype == dtype
        and (bn.weight is None or bn.weight.dtype == dtype)
        and var.shape[-1] == w.shape[var.ndim - 1]  # output channels
        and not torch.is_grad_enabled()
        and not torch.is_autocast_enabled(w.device.type)
    )


def batchnorm_affine(bn: Any, mean: Tensor, var: Tensor) -> tuple[Tensor, Tensor]:
    """``(scale, shift)`` per channel with ``bn(x) = x * scale + shift`` for statistics
    ``mean``/``var`` (each ``(N, C)`` for a stacked BatchNorm, ``(C,)`` for a member's)."""
    scale = torch.rsqrt(var + bn.eps)
    shift = -mean * scale
    if bn.affine:
        scale = scale * bn.weight
        shift = torch.addcmul(bn.bias, shift, bn.weight)
    return scale, shift


def fold_batchnorm(w: Tensor, b: Tensor | None, bn: Any) -> tuple[Tensor, Tensor]:
    """The conv weight and bias with eval-mode BatchNorm ``bn`` folded in (see
    :func:`foldable_batchnorm`): ``w * scale`` and ``b * scale + shift`` per output channel.
    ``w`` and ``bn``'s tensors both carry a leading member dim, or neither does; the product
    keeps ``w``'s memory format (channels-last stays channels-last)."""
    scale, shift = batchnorm_affine(bn, bn.running_mean, bn.running_var)
    w = w * scale.view(*scale.shape, *([1] * (w.ndim - scale.ndim)))
    return w, shift if b is None else torch.addcmul(shift, b, scale)


class _BatchNorm(Fused):
    how = "fused: per-member statistics on the stacked activations"

    def forward(self, x: Tensor) -> Tensor:
        m = self.orig
        x = self.expand(x)  # (N, B, C, *s)
        if x.ndim < 3:
            raise ValueError(
                f"expected a batch and a channel dim per member, got shape {tuple(x.shape[1:])}"
            )
        dims = _BATCHNORM_DIMS.get(type(m))
        if dims is not None and x.ndim - 1 not in dims:  # as the layer's own _check_input_dim
            want = " or ".join(f"{d}D" for d in dims)
            raise ValueError(f"expected {want} input (got {x.ndim - 1}D input)")
        shape_c = (self.n, 1, x.shape[2]) + (1,) * (x.ndim - 3)
        reduce = (1, *range(3, x.ndim))
        factor: float | Tensor = 0.0 if m.momentum is None else m.momentum
        if m.training and m.track_running_stats and m.num_batches_tracked is not None:
            m.num_batches_tracked.add_(1)
            if m.momentum is None:
                factor = (1.0 / m.num_batches_tracked.double()).to(m.running_mean.dtype).view(-1, 1)
        use_batch_stats = m.training or (m.running_mean is None and m.running_var is None)
        if use_batch_stats:
            count = x.numel() // (x.shape[0] * x.shape[2])
            if m.training and count == 1:
                raise ValueError(
                    f"Expected more than 1 value per channel when training, got input size {x.shape[1:]}"
                )
            # statistics in the BatchNorm's own dtype, as the loop's batch_norm computes them
            # (float32 statistics of a bfloat16 activation under mixed precision)
            stats = m.running_mean if m.running_mean is not None else m.weight
            xs = x if stats is None or stats.dtype == x.dtype else x.to(stats.dtype)
            var, mean = torch.var_mean(xs, dim=reduce, correction=0)  # (N, C)
            if m.training and m.track_running_stats and m.running_mean is not None:
                with torch.no_grad():
                    m.running_mean.lerp_(mean, factor)
                    m.running_var.lerp_(var * (count / max(count - 1, 1)), factor)
        else:
            mean, var = m.running_mean, m.running_var
        scale, shift = batchnorm_affine(m, mean, var)  # (N, C) each: one pass over x
        y = torch.addcmul(shift.view(shape_c), x, scale.view(shape_c))
        # float32 statistics on a lower-precision activation (mixed precision): the loop's
        # batch_norm returns the activation's dtype
        return y if y.dtype == x.dtype else y.to(x.dtype)


class ConvBatchNorm:
    """A fused convolution and the BatchNorm that alone reads its output.

    In eval mode without autograd, with running statistics and one float32/float64 dtype,
    the BatchNorm is folded into the stacked convolution weights, per member and output
    channel: ``w' = w * s``, ``b' = (b - running_mean) * s + beta`` with
    ``s = gamma / sqrt(running_var + eps)``, computed on every call (nothing goes stale). One
    pass over the stacked activations fewer. Otherwise the two layers run as they are.
    """

    how = (
        "fused: folded into the convolution before it (eval mode, no autograd); else "
        "per-member statistics on the stacked activations"
    )

    def __init__(self, conv: _Conv, bn: _BatchNorm) -> None:
        self.conv, self.bn = conv, bn

    def forward(self, x: Tensor) -> Tensor:
        conv, bn, m = self.conv, self.bn, self.bn.orig
        w = conv.orig.weight  # (N, O, C/g, *k)
        full = x.ndim - conv.batched[0] == w.ndim - 1  # a batch dim: BN's channels are O
        if not full or not foldable_batchnorm(w, m):
            return bn.forward(conv.forward(x))
        return conv.run(x, *fold_batchnorm(w, conv.orig.bias, m))


class _LayerNorm(Fused):
    how = "fused: layer_norm on the stacked activations, per-member affine"

    def forward(self, x: Tensor) -> Tensor:
        m = self.orig
        y = F.layer_norm(x, m.normalized_shape, None, None, m.eps)
        if not self.batched[0]:
            y = y.unsqueeze(0)
        if m.weight is None:
            return self.expand(y) if not self.batched[0] else y
        w = _bview(m.weight, y.ndim)
        return torch.addcmul(_bview(m.bias, y.ndim), y, w) if m.bias is not None else y * w


class _GroupNorm(Fused):
    how = "fused: group_norm with members folded into the batch, per-member affine"

    def forward(self, x: Tensor) -> Tensor:
        m = self.orig
        x = self.expand(x)  # (N, B, C, *s)
        y = F.group_norm(x.reshape(-1, *x.shape[2:]), m.num_groups, None, None, m.eps).view(x.shape)
        if m.affine:
            y = torch.addcmul(_bview(m.bias, y.ndim, 2), y, _bview(m.weight, y.ndim, 2))
        return y


class _Embedding(Fused):
    how = "fused: one embedding lookup in the members' concatenated tables"

    def forward(self, idx: Tensor) -> Tensor:
        m = self.orig
        w = m.weight  # (N, V, D)
        n, vocab, dim = w.shape
        if m.sparse:  # sparse gradients: one lookup per member in its own table (neither
            # reshape nor select has a sparse backward; unbind has)
            rows = idx.unbind(0) if self.batched[0] else [idx] * n
            return torch.stack(
                [
                    F.embedding(
                        r, t, m.padding_idx, m.max_norm, m.norm_type, m.scale_grad_by_freq, True
                    )
                    for r, t in zip(rows, w.unbind(0))
                ]
            )
        logical = idx.ndim - self.batched[0]
        offsets = (torch.arange(n, device=idx.device) * vocab).view(n, *([1] * logical))
        # each member's rows are its own in the concatenated table: max_norm renormalises them
        # in place, and scale_grad_by_freq counts each member's indices apart
        y = F.embedding(
            idx + offsets,
            w.reshape(n * vocab, dim),
            None,
            m.max_norm,
            m.norm_type,
            m.scale_grad_by_freq,
        )
        if m.padding_idx is not None:  # no gradient flows into the padding row, as in nn.Embedding
            pad = (idx == m.padding_idx).unsqueeze(-1)
            y = torch.where(pad, y.detach(), y)
        return y


class _PReLU(Fused):
    how = "fused: per-member slopes broadcast over the stacked activations"

    def forward(self, x: Tensor) -> Tensor:
        w = self.orig.weight  # (N, P)
        x = self.expand(x)
        if w.shape[1] != 1 and x.ndim < 3:
            # torch counts one channel in a member input with fewer than 2 dims (the loop then
            # raises the same; slopes per element would be a result no member could give)
            raise RuntimeError(
                "Mismatch of parameter numbers and input channel size. Found parameter "
                f"numbers = {w.shape[1]} and channel size = 1."
            )
        if w.shape[1] == 1:
            wv = w.view(self.n, *([1] * (x.ndim - 1)))
        else:
            wv = _bview(w, x.ndim, 2 if x.ndim >= 3 else 1)
        return torch.where(x > 0, x, wv * x)


class _Direct(Fused):
    """A parameter-free layer that acts per element or per trailing dims: call it as is."""

    how = "fused: the layer itself, applied to the stacked activations"

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        m = self.orig  # the plainest activations go straight to their torch function
        simple = {nn.ReLU: torch.relu, nn.Tanh: torch.tanh, nn.Sigmoid: torch.sigmoid}
        plain = type(m) in simple and not getattr(m, "inplace", False)
        self.fn: Callable[[Tensor], Tensor] = simple[type(m)] if plain else m.forward
        # what the program calls in place of this wrapper (a torch function: no Python frame)
        self.direct: Callable[[Tensor], Tensor] | None = self.fn if plain else None

    def forward(self, x: Tensor) -> Tensor:
        return self.fn(x)  # hooks are refused before tracing: no __call__ needed


class _Dropout(Fused):
    @property
    def how(self) -> str:  # type: ignore[override]  # computed: the base class's is a string
        if self.randomness == "same":
            return "fused: one mask, the same for every member (randomness='same')"
        return "fused: one mask over the stacked activations (independent per member)"

    def forward(self, x: Tensor) -> Tensor:
        if not self.orig.training:  # the identity; its output has the member dim, as always
            return x if self.batched[0] else self.expand(x)
        if self.randomness == "same":  # (not in place: see fused_layer_for)
            if not self.batched[0]:
                return self.expand(self.orig(x))  # one draw, as every member's
            return x * self.orig(torch.ones_like(x[0]))  # one member's mask, scaled, for all
        if not self.batched[0]:
            x = x.unsqueeze(0).repeat(self.n, *([1] * x.ndim))
        return self.orig(x)


def _shift(d: int) -> int:
    return d + 1 if d >= 0 else d


class _Softmax(Fused):
    how = "fused: softmax over the member's dim"

    def forward(self, x: Tensor) -> Tensor:
        m = self.orig
        fn = {nn.Softmax: F.softmax, nn.LogSoftmax: F.log_softmax, nn.Softmin: F.softmin}[type(m)]
        return fn(x, dim=_shift(m.dim))


class _Flatten(Fused):
    how = "fused: flatten with the member dim kept"

    def forward(self, x: Tensor) -> Tensor:
        m = self.orig
        return x.flatten(_shift(m.start_dim), _shift(m.end_dim))


class _Unflatten(Fused):
    how = "fused: unflatten with the member dim kept"

    def forward(self, x: Tensor) -> Tensor:
        m = self.orig
        return x.unflatten(_shift(m.dim), m.unflattened_size)


_POOLS: dict[type[nn.Module], int] = {
    nn.MaxPool1d: 1,
    nn.MaxPool2d: 2,
    nn.MaxPool3d: 3,
    nn.AvgPool1d: 1,
    nn.AvgPool2d: 2,
    nn.AvgPool3d: 3,
    nn.AdaptiveAvgPool1d: 1,
    nn.AdaptiveAvgPool2d: 2,
    nn.AdaptiveAvgPool3d: 3,
    nn.AdaptiveMaxPool1d: 1,
    nn.AdaptiveMaxPool2d: 2,
    nn.AdaptiveMaxPool3d: 3,
    nn.LPPool1d: 1,
    nn.LPPool2d: 2,
}


class _Pool(Fused):
    how = "fused: pooling with members folded into the batch"

    def forward(self, x: Tensor) -> Tensor:
        spatial = _POOLS[type(self.orig)]
        if x.ndim - 1 == spatial + 2:  # (N, B, C, *s): fold members into the batch
            y = self.orig(x.flatten(0, 1))
            y = y.unflatten(0, (self.n, x.shape[1]))
        else:
            y = self.orig(x)  # (N, C, *s): the member dim plays the batch
        if self.layout_unseen:
            return y
        # where the layout is seen, the input has the member's (see fused.mark_unseen_layouts):
        # the result as the member's pooling lays it out (channels-last stays channels-last)
        x0 = self.member_input(x[0])
        key = (sizes(x0), x0.stride(), x.dtype, x.device)
        order, known = self.member_layout(key, lambda: self.orig(x0))
        return in_member_order(y, order) if known else y.contiguous()


# Wrappers whose output is always new memory (never an input or a view of one)
FRESH_OUTPUT: tuple[type, ...] = (_Linear, _Conv, ConvBatchNorm)

# Wrappers that read their input in any layout and never write it. A Linear's output layout
# never depends on its input's: what comes after it cannot tell its input's layout. A conv's
# and a pooling's follow their input's (channels-last stays channels-last): only when their
# own output's layout is unseen too can nothing tell (see fused.mark_unseen_layouts); else
# they lay out their result as the member's, learned from its input.
READS_ANY_LAYOUT: tuple[type[Fused], ...] = (_Linear, _Conv, _Pool)
LAYOUT_FOLLOWS_INPUT: tuple[type[Fused], ...] = (_Conv, _Pool)

# Wrappers that read a batched input in whatever layout it comes, never through a view of
# another shape, and write to it (an in-place activation) only through the tensor itself: a
# narrow Linear's transposed output (see NARROW_OUTPUTS) gives them what the member's
# contiguous one would. Their outputs may keep that layout.
LAYOUT_BLIND: tuple[type, ...] = (
    _Direct,
    _Dropout,
    _Softmax,
    _BatchNorm,
    _LayerNorm,
    _GroupNorm,
    _PReLU,
)

PARAM_FREE_ELEMENTWISE: tuple[type[nn.Module], ...] = (
    nn.Identity,
    nn.ReLU,
    nn.ReLU6,
    nn.GELU,
    nn.Tanh,
    nn.Sigmoid,
    nn.SiLU,
    nn.Mish,
    nn.LeakyReLU,
    nn.ELU,
    nn.CELU,
    nn.SELU,
    nn.Softplus,
    nn.Softsign,
    nn.Hardtanh,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Hardshrink,
    nn.Softshrink,
    nn.Tanhshrink,
    nn.LogSigmoid,
    nn.Threshold,
)

FUSED_LAYERS: dict[type[nn.Module], type[Fused]] = {
    nn.Linear: _Linear,
    nn.Conv1d: _Conv,
    nn.Conv2d: _Conv,
    nn.Conv3d: _Conv,
    nn.BatchNorm1d: _BatchNorm,
    nn.BatchNorm2d: _BatchNorm,
    nn.BatchNorm3d: _BatchNorm,
    nn.LayerNorm: _LayerNorm,
    nn.GroupNorm: _GroupNorm,
    nn.Embedding: _Embedding,
    nn.PReLU: _PReLU,
    nn.Dropout: _Dropout,
    nn.Softmax: _Softmax,
    nn.LogSoftmax: _Softmax,
    nn.Softmin: _Softmax,
    nn.Flatten: _Flatten,
    nn.Unflatten: _Unflatten,
    **dict.fromkeys(_POOLS, _Pool),
    **dict.fromkeys(PARAM_FREE_ELEMENTWISE, _Direct),
}


def fused_layer_for(
    module: nn.Module, batched: tuple[bool, ...], randomness: str
) -> type[Fused] | None:
    """The batched implementation for ``module`` called on inputs with these flags, if any."""
    cls = FUSED_LAYERS.get(type(module))
    if cls is None or len(batched) != 1 or parametrize.is_parametrized(module):
        return None
    if cls is _Dropout and not (
        randomness == "different" or (randomness == "same" and not module.inplace)
    ):  # (under "error", vmap raises as it should; a shared input written in place by every
        # member in turn is the loop's to run)
        return None
    if cls is _Softmax and getattr(module, "dim", None) is None:
        return None
    if cls is _Pool and getattr(module, "return_indices", False):
        return None
    return cls


def describe(wrapper: Any) -> str:
    """How a wrapper runs its layer, for ``Ensemble.explain()``."""
    return str(getattr(wrapper, "how", type(wrapper).__name__))

"""One call of an ensemble: the stacked state, the inputs and how they map to members."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import Tensor, nn

__all__ = [
    "Call",
    "copy_buffers",
    "restore_buffers",
    "stack_outputs",
    "state_device",
    "vmap_friendly_kernels",
]


@dataclass
class Call:
    """Everything a backend needs to run all members on one set of inputs.

    Attributes:
        template: member 0's module tree holding the stacked tensors (leading dim ``n``).
        n: the number of members.
        args: positional inputs; ``in_dims[k]`` says which dim of ``args[k]`` indexes members.
        kwargs: keyword inputs, passed to every member unchanged.
        in_dims: one ``int | None`` per positional argument.
        randomness: ``"different"``, ``"same"`` or ``"error"`` (as in ``torch.vmap``).
        chunk_size: at most this many members run at once (``None``: all).
        name: the template's path in a larger model, for messages.
    """

    template: nn.Module
    n: int
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    in_dims: tuple[int | None, ...]
    randomness: str = "different"
    chunk_size: int | None = None
    name: str = ""

    # computed on first use, without functools.cached_property: its lock (Python 3.11) is a
    # context manager that torch.compile(fullgraph=True) cannot trace

    @property
    def tensor_args(self) -> bool:
        """No keyword inputs and every positional input a tensor: the common, fast case."""
        value = self.__dict__.get("_tensor_args")
        if value is None:
            value = self._tensor_args = not self.kwargs and all(
                isinstance(a, Tensor) for a in self.args
            )
        return value

    @property
    def state(self) -> dict[str, Tensor]:
        """The stacked parameters and buffers by (canonical) name."""
        value = self.__dict__.get("_state")
        if value is None:
            value = self._state = {
                **dict(self.template.named_parameters()),
                **dict(self.template.named_buffers()),
            }
        return value

    def remember_input_versions(self) -> None:
        """Note each input tensor's version counter before a first attempt (kept if noted
        already): a failed attempt that modified an input in place leaves the next one other
        values (see :meth:`modified_input`)."""
        if "_versions" in self.__dict__ or torch.compiler.is_compiling():
            return
        leaves = pytree.tree_leaves((self.args, self.kwargs))
        # (an inference tensor has no version counter: a write to it goes unnoticed here)
        self._versions = [
            (t, t._version) for t in leaves if isinstance(t, Tensor) and not t.is_inference()
        ]

    def modified_input(self) -> int | None:
        """The position (among the input tensors) of one a failed attempt modified in place."""
        for k, (t, version) in enumerate(self.__dict__.get("_versions", ())):
            if t._version != version:
                return k
        return None

    def member_args(self, i: int) -> tuple[Any, ...]:
        """The positional inputs member ``i`` sees."""

        def pick(arg: Any, dim: int | None) -> Any:
            if dim is None:
                return arg
            return pytree.tree_map_only(Tensor, lambda t: t.select(dim, i), arg)

        return tuple(pick(a, d) for a, d in zip(self.args, self.in_dims))

    def snapshot_buffers(self) -> dict[str, Tensor]:
        """Copies of the buffers, to undo in-place updates of a failed attempt."""
        return copy_buffers(self.template)

    def restore_buffers(self, snapshot: dict[str, Tensor]) -> None:
        restore_buffers(self.template, snapshot)

    def input_keeper(self) -> Callable[[], None]:
        """Copy the input tensors now; the returned function writes back the values of any
        that were modified in place since (by version counter), so repeated runs of one call
        (``auto``'s measurement) each see the inputs the caller passed, and leave them so.

        A forward that doubles its input in place then doubles it once per real call, not
        once per timed run. Inputs no forward can write to (expanded, overlapping memory) are
        never modified, so their copies are never used. An inference tensor has no version
        counter: its values are compared instead.
        """
        leaves = pytree.tree_leaves((self.args, self.kwargs))
        tensors = [t for t in leaves if isinstance(t, Tensor)]
        copies = [t.detach().clone() for t in tensors]
        versions = [None if t.is_inference() else t._version for t in tensors]

        def put_back() -> None:
            with torch.no_grad():
                for k, t in enumerate(tensors):
                    if versions[k] is None:
                        if not torch.equal(t, copies[k]):  # (or a NaN, never equal)
                            # a tensor nothing can write (expanded, or outside inference
                            # mode) was not written by the forward either
                            with contextlib.suppress(RuntimeError):
                                t.copy_(copies[k])
                    elif t._version != versions[k]:
                        t.copy_(copies[k])
                        versions[k] = t._version

        return put_back


def copy_buffers(module: nn.Module) -> dict[str, Tensor]:
    """Copies of ``module``'s buffers by name (see :func:`restore_buffers`)."""
    return {k: b.detach().clone() for k, b in module.named_buffers()}


def restore_buffers(module: nn.Module, snapshot: dict[str, Tensor]) -> None:
    """Write a :func:`copy_buffers` snapshot back into ``module``'s buffers, in place (an
    inference tensor's within inference mode: only there may it be written)."""
    with torch.no_grad():
        for k, b in module.named_buffers():
            only_in_inference = b.is_inference() and not torch.is_inference_mode_enabled()
            with torch.inference_mode() if only_in_inference else contextlib.nullcontext():
                b.copy_(snapshot[k])


def stack_outputs(outputs: list[Any], join: Callable[..., Tensor] = torch.stack) -> Any:
    """Stack per-member outputs (tensors, or tuples/lists/dicts of them) along a new dim 0;
    with ``join=torch.cat``, join outputs that carry the member dim already (blocks of
    members). A leaf that is not a tensor is the first output's."""
    flat = [pytree.tree_flatten(o) for o in outputs]
    spec = flat[0][1]
    columns = zip(*(leaves for leaves, _ in flat))
    stacked = [join(col) if isinstance(col[0], Tensor) else col[0] for col in columns]
    return pytree.tree_unflatten(stacked, spec)


@contextlib.contextmanager
def vmap_friendly_kernels(device: torch.device | None = None) -> Iterator[None]:
    """Steer attention to kernels that vmap can batch, for the duration of a vmap call.

    The fused fast path of ``nn.MultiheadAttention``/``TransformerEncoderLayer`` and the CPU
    flash-attention kernel of ``scaled_dot_product_attention`` have no batching rule (vmap
    would fail, or loop over members slowly); the regular path and the math kernel compute
    the same and batch well. On CUDA (torch 2.11, H100) the memory-efficient kernel's backward
    fails on vmapped inputs ("LSE is not correctly aligned"), so the math kernel is used on
    every device; ``device`` is accepted for callers that know it.
    """
    with contextlib.ExitStack() as stack:
        mha = getattr(torch.backends, "mha", None)
        if mha is not None:
            enabled = mha.get_fastpath_enabled()
            mha.set_fastpath_enabled(False)
            stack.callback(mha.set_fastpath_enabled, enabled)
        from torch.nn.attention import SDPBackend, sdpa_kernel

        stack.enter_context(sdpa_kernel([SDPBackend.MATH]))
        stack.enter_context(autocast_linear(device))
        yield


def autocast_linear(device: torch.device | None) -> contextlib.AbstractContextManager[Any]:
    """Under autocast for ``device``'s type, :class:`_AutocastLinear` for a vmap call; else
    nothing."""
    kind = "cuda" if device is None else device.type
    if torch.is_autocast_enabled(kind):
        return _AutocastLinear(kind)
    return contextlib.nullcontext()


class _AutocastLinear(torch.overrides.TorchFunctionMode):
    """``F.linear`` under autocast as a member alone gets it: input, weight and bias cast to
    the autocast dtype. vmap's batching rule splits a batched linear into a matmul, which
    autocast casts, and a bias add, which it does not: the float32 bias then promoted every
    such output to float32 where the loop gives bfloat16 / float16."""

    def __init__(self, device_type: str) -> None:
        super().__init__()
        self.device_type = device_type

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func is torch.nn.functional.linear and torch.is_autocast_enabled(self.device_type):
            dtype = torch.get_autocast_dtype(self.device_type)  # (a nested autocast's own)
            args = tuple(self._cast(a, dtype) for a in args)
            kwargs = {k: self._cast(v, dtype) for k, v in kwargs.items()}
        return func(*args, **kwargs)

    def _cast(self, t: Any, dtype: torch.dtype) -> Any:
        # what autocast casts: floating tensors of its device, float64 aside
        if (
            isinstance(t, Tensor)
            and t.is_floating_point()
            and t.dtype != torch.float64
            and t.device.type == self.device_type
        ):
            return t.to(dtype)
        return t


# each module's attributes as a forward found them: (path, its __dict__, a copy)
HeldAttributes = list[tuple[str, dict[str, Any], dict[str, Any]]]


def under(path: str, roots: Iterable[str]) -> bool:
    """Whether module ``path`` is one of ``roots`` or inside one."""
    return any(path == r or path.startswith(r + ".") for r in roots)


def hold_attributes(
    template: nn.Module, skip: Iterable[str] = (), slots: bool = False
) -> HeldAttributes:
    """Every module's attributes now (those under the ``skip`` paths aside), to put back what
    a forward assigns on its modules (see :func:`put_back_attributes`). With ``slots``, its
    parameter and buffer slots too (``self.count = ...`` on a buffer assigns into them)."""
    skip = tuple(skip)
    modules = [(path, m) for path, m in template.named_modules() if not under(path, skip)]
    held = [(path, m.__dict__, dict(m.__dict__)) for path, m in modules]
    if slots:
        held += [(path, d, dict(d)) for path, m in modules for d in (m._parameters, m._buffers)]
    return held


def put_back_attributes(
    held: HeldAttributes, tensors_only: bool = False
) -> list[tuple[str, str, Any]]:
    """Undo the attributes assigned since :func:`hold_attributes` (with ``tensors_only``, those
    whose old or new value is a tensor); ``(path, name, the value assigned)`` for each."""
    undone = []
    for path, d, old in held:
        for k in d.keys() | old.keys():
            new = d.get(k, d)
            if new is old.get(k, old):
                continue
            if tensors_only and not (isinstance(new, Tensor) or isinstance(old.get(k), Tensor)):
                continue
            undone.append((path, k, new))
            if k in old:
                d[k] = old[k]
            else:
                del d[k]
    return sorted(undone, key=lambda u: (u[0], u[1]))


def state_device(state: dict[str, Tensor]) -> torch.device | None:
    """The device of the first stacked tensor, if any."""
    return next((t.device for t in state.values()), None)


def rng_snapshot(device: torch.device | None) -> Callable[[], None]:
    """The RNG state now (the CPU generator's, and the device's for CUDA) as a function that
    puts it back: a failed attempt that drew random numbers (dropout) must leave the next
    attempt the draws the call started with, so that a seeded call gives what the path it
    ends on gives on every later call."""
    if torch.compiler.is_compiling():  # (dynamo does not trace it; the eager calls do it)
        return _nothing
    cpu = torch.get_rng_state()
    gpu = device if device is not None and device.type == "cuda" else None
    cuda = None if gpu is None else torch.cuda.get_rng_state(gpu)

    def restore() -> None:
        torch.set_rng_state(cpu)
        if gpu is not None and cuda is not None:
            torch.cuda.set_rng_state(cuda, gpu)

    return restore


def _nothing() -> None:
    pass

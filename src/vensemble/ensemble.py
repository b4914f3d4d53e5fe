"""Ensemble: N same-architecture modules stacked into one ``nn.Module``."""

from __future__ import annotations

import contextlib
import functools
import math
import operator
import os
import textwrap
import threading
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import Tensor, nn

from ._errors import EnsembleError
from ._layout import in_member_format, use_kernel_layout
from ._state import (
    MODULE_INTERNALS,
    member_module,
    reindex_template,
    stack_members,
    validate_members,
)
from ._tree import GENERATION, changed_settings, settings_changed, traced_settings
from .backends import (
    BACKENDS,
    AutoPlan,
    Call,
    FallbackWarning,
    auto_forward,
    loop_forward,
    strict_vmap_forward,
)
from .backends._autotune import (
    BackwardFailed,
    in_func_transform,
    measure_paths,
    measuring_allowed,
)
from .backends._call import (
    copy_buffers,
    hold_attributes,
    put_back_attributes,
    restore_buffers,
    rng_snapshot,
    state_device,
)
from .backends._layers import _is_compiling, _jit_tracing
from .backends.blocked import MIN_BLOCK, BlockedPlan, blocked_forward
from .backends.folded import FoldedPlan, folded_program
from .backends.fused import (
    FusedPlan,
    FusedProgram,
    Memo,
    Untraceable,
    contiguous_outputs,
    fused_forward,
    hook_dicts,
    hooked,
    tracing_now,
)
from .backends.native import NativePlan, Unfit, may_run, native_forward
from .backends.select import check_loop_runs, raise_if_randomness_error, snapshot_buffers

__all__ = ["Ensemble"]

_RANDOMNESS = ("different", "same", "error")


# How much faster (as a time ratio) one path must measure for auto to leave the default path.
# On CUDA the default is the vectorized path: the loop must be 15% faster. On a CPU the default
# is the loop when the two are close: a batched activation many times the size of a member's
# leaves the cache, so the vectorized path's time swings with the memory traffic of whatever
# else runs on the machine (an 8-member CNN measured 25 ms in one moment and 50-75 ms later),
# while the loop's cache-resident time does not; the vectorized path must be 15% faster.
_MARGIN = 0.85

# A fast-path entry: the program, auto's choice (for explain) and whether buffers are saved
# first (training mode with buffers: a failed call must not leave running stats half updated)
# (the program, auto's choice, whether to snapshot buffers, what runs the program)
_FastEntry = tuple[FusedProgram, "tuple[str, dict[str, float]] | None", bool, Callable[..., Any]]
_MISS = object()
_TRAINING = operator.attrgetter("training")  # map() over modules: no bytecode per module
_FAST_MAX_ENTRIES = 64  # call keys remembered at most (a key per input shape, mode, ...)
_HOOKED: tuple[str, dict[str, float]] = ("loop", {})  # _last_choice when hooks made it the loop


class _FastPaths(dict[tuple[Any, ...], _FastEntry]):
    """The fast path's programs by call key; a copy (deepcopy, pickle) starts empty, as
    ``FusedPlan`` does: programs belong to the template they were traced from."""

    # the latest call with one tensor input and in_dims=None, as (key, entry): the next call
    # compares its fields directly (no key built, no hash), the common case of a repeated call
    last: tuple[tuple[Any, ...], _FastEntry] | None = None

    def __init__(self) -> None:
        super().__init__()
        # taken by every eager call of the ensemble: calls from several threads run one at a
        # time (auto's measurement and the loop put each member's views into the template's
        # slots, which a call running beside them would read)
        self.lock = threading.RLock()
        _LOCKED[id(self)] = self

    def clear(self) -> None:
        self.last = None
        super().clear()

    def remember(self, key: tuple[Any, ...], entry: _FastEntry) -> None:
        """Keep ``entry`` for ``key``; all are dropped first once ``_FAST_MAX_ENTRIES`` are
        kept (shapes that keep changing)."""
        if len(self) >= _FAST_MAX_ENTRIES:
            self.clear()
        self[key] = entry

    def __deepcopy__(self, memo: dict[int, Any]) -> _FastPaths:
        return _FastPaths()

    def __reduce__(self) -> tuple[Any, ...]:
        return (_FastPaths, ())


# Every ensemble's _FastPaths: a child forked while another thread was inside a call gets
# fresh locks (the owner of the inherited one does not exist in the child)
_LOCKED: weakref.WeakValueDictionary[int, _FastPaths] = weakref.WeakValueDictionary()


def _fresh_locks_after_fork() -> None:
    for fast in list(_LOCKED.values()):
        fast.lock = threading.RLock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_fresh_locks_after_fork)

# auto's choice under torch.use_deterministic_algorithms(True): fixed, not timed
_UNMEASURED: tuple[str, dict[str, float]] = ("vectorized", {})


def _loop_wins(loop: float, vectorized: float, device: torch.device) -> bool:
    """Whether ``auto`` runs the loop, given both paths' measured seconds (see ``_MARGIN``).

    Example:
        >>> cpu, cuda = torch.device("cpu"), torch.device("cuda")
        >>> _loop_wins(1.0, 1.1, cpu), _loop_wins(1.0, 1.1, cuda), _loop_wins(1.0, 2.0, cuda)
        (True, False, True)
        >>> _loop_wins(1.0, 0.8, cpu), _loop_wins(1.0, 0.9, cuda)
        (False, False)
    """
    if device.type == "cpu":
        return not vectorized < _MARGIN * loop
    return loop < _MARGIN * vectorized


def _root_setting(template: nn.Module, name: str) -> bool:
    """Whether ``name`` is a public plain setting of the member's root module: an attribute
    of its own (not one of ``nn.Module``'s; private names are the ensemble's own), or a plain
    value its class holds as a default (``mask = None`` in the class body)."""
    if name[:1] == "_" or name in MODULE_INTERNALS:
        return False
    if name in template.__dict__:
        return True
    for klass in type(template).__mro__:
        if klass.__module__.startswith("torch.") or klass is object:
            continue
        if name in vars(klass):
            default = vars(klass)[name]
            return not (callable(default) or hasattr(default, "__get__"))  # (no descriptor)
    return False


def _shape_key(call: Call, training: bool) -> Any:
    """What the fastest path depends on: input shapes, dtypes, devices, values and mode."""
    grad = torch.is_grad_enabled()
    if call.tensor_args:  # the common case, fast
        shapes = tuple((a.shape, a.dtype, a.device) for a in call.args)
        return (shapes, call.in_dims, training, grad)
    leaves = pytree.tree_leaves((call.args, call.kwargs))
    described = tuple(
        (tuple(t.shape), t.dtype, t.device) if isinstance(t, Tensor) else repr(t) for t in leaves
    )
    return (described, call.in_dims, tuple(call.kwargs), training, grad)


@contextlib.contextmanager
def _memory_format_held(fn: Callable[..., Any]) -> Iterator[torch.memory_format | None]:
    """The ``memory_format`` that ``nn.Module.to``'s conversion function ``fn`` carries (in its
    closure), held back (``None`` there) while the block runs; ``None`` for any other ``fn``."""
    code = getattr(fn, "__code__", None)
    closure = getattr(fn, "__closure__", None)
    if code is None or closure is None or "convert_to_format" not in code.co_freevars:
        yield None
        return
    cell = closure[code.co_freevars.index("convert_to_format")]
    fmt = cell.cell_contents
    cell.cell_contents = None
    try:
        yield fmt
    finally:
        cell.cell_contents = fmt


class Ensemble(nn.Module):
    """N models of one architecture, stacked and run as one module.

    Every parameter and buffer of the members is stacked along a new leading member
    dimension of size ``N``; the ensemble's ``state_dict()`` has the member's keys with that
    leading dimension, and ``parameters()`` are the stacked leaves, so any torch optimizer
    over them trains all members at once. The ensemble copies the members' state: the
    source modules are never changed and never receive gradients.

    Args:
        models: the members, all the same architecture (see :func:`vensemble.fingerprint`).
        backend: ``"auto"`` (vmap, with a per-submodule loop where vmap cannot run),
            ``"vmap"`` (torch.func only; raises :class:`EnsembleError` where it cannot run),
            ``"loop"`` (one member after another: the reference) or ``"fused"`` (currently
            the same as ``"auto"``).
        randomness: how random ops (dropout) draw across members, as in ``torch.vmap``:
            ``"different"`` (independent per member), ``"same"`` or ``"error"``.
        chunk_size: run at most this many members at once to bound peak memory
            (``None``: all of them).
        compile: ``True`` (or a dict of ``torch.compile`` options, e.g.
            ``{"mode": "reduce-overhead"}`` for CUDA graphs) compiles the fused program of
            each call signature after its first eager call; the compile time is reported by
            :meth:`explain` (``"(compile)"``). Same shapes never recompile. Models the fused
            path cannot trace run uncompiled (vmap).

    Shapes:
        ``ens(x)`` with ``x`` of shape ``(B, ...)`` returns ``(N, *member_output_shape)``;
        ``ens(xs, in_dims=0)`` with ``xs`` of shape ``(N, B, ...)`` gives member ``i`` the
        input ``xs[i]``. Tuples, lists and dicts of tensors are returned stacked leaf by leaf.

    Raises:
        EnsembleError: when the members cannot be stacked; the message names the member
            index and the module, parameter or attribute that differs.

    Example:
        >>> import torch, vensemble as ve
        >>> ens = ve.Ensemble.from_factory(lambda: torch.nn.Linear(4, 2), 3, seed=0)
        >>> ens(torch.randn(5, 4)).shape
        torch.Size([3, 5, 2])
    """

    _template: nn.Module
    _num_members: int
    _plan: AutoPlan
    _fused: FusedPlan
    _blocked: BlockedPlan
    _native: NativePlan

    def __init__(
        self,
        models: Iterable[nn.Module],
        backend: str = "auto",
        randomness: str = "different",
        chunk_size: int | None = None,
        compile: bool | dict[str, Any] = False,
    ) -> None:
        super().__init__()
        members = list(models)
        self._configure(backend, randomness, chunk_size, compile)
        validate_members(members)
        self._adopt(stack_members(members), len(members))

    # ----------------------------------------------------------------------------- building

    def _configure(
        self,
        backend: str,
        randomness: str,
        chunk_size: int | None,
        compile: bool | dict[str, Any],
    ) -> None:
        if backend not in BACKENDS:
            raise EnsembleError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if randomness not in _RANDOMNESS:
            raise EnsembleError(f"randomness must be one of {_RANDOMNESS}, got {randomness!r}")
        if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
            raise EnsembleError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
        if not isinstance(compile, (bool, dict)):
            raise EnsembleError(
                f"compile must be a bool or a dict of torch.compile options, got {compile!r}"
            )
        options = (dict(compile) if isinstance(compile, dict) else {}) if compile else None
        self.compile_options: dict[str, Any] | None = options
        self.backend = backend
        self.randomness = randomness
        self.chunk_size = chunk_size

    def _adopt(self, template: nn.Module, n: int) -> None:
        """Make the stacked ``template``'s state this module's own (shared, not copied).

        The ensemble shares the template's parameter, buffer and child dicts, so everything
        ``nn.Module`` does (``state_dict``, ``parameters``, ``to``, ``zero_grad``, nesting in a
        larger model) sees the member's names with stacked tensors. ``nn.Linear`` weights are
        stored in the layout the batched kernels want (see ``vensemble._layout``).
        """
        use_kernel_layout(template)
        object.__setattr__(self, "_template", template)
        object.__setattr__(self, "_parameters", template._parameters)
        object.__setattr__(self, "_buffers", template._buffers)
        object.__setattr__(self, "_modules", template._modules)
        object.__setattr__(
            self, "_non_persistent_buffers_set", template._non_persistent_buffers_set
        )
        self._num_members = n
        self._has_buffers = next(template.buffers(), None) is not None
        self._plan = AutoPlan()
        self._choices = Memo("auto's measured choices")  # call key -> (path, timings)
        self._last_choice: tuple[str, dict[str, float]] | None = None
        self._fast = _FastPaths()
        self._forward_state: frozenset[tuple[int, str]] = frozenset()  # (see _settings_are_state)
        self._forget_programs()  # (makes the empty plans)
        self._index_modules()
        self.training = template.training

    def _index_modules(self) -> None:
        """The member's module tree as each call checks it, in a few C-level passes: every
        module (their training flags), every module's child dict and what it held (a
        submodule replaced, added or removed later is noticed: see ``_check_modules``), and
        the hook dicts of the modules and of the ensemble itself (see ``hooked``)."""
        self._module_list = list(self._template.modules())
        dicts = [m._modules for m in self._module_list]
        self._leaf_dicts = [d for d in dicts if not d]  # must stay empty (one any() for all)
        self._parent_dicts = [d for d in dicts if d]
        self._children = list(map(tuple, map(dict.values, self._parent_dicts)))
        self._child_counts = list(map(len, self._parent_dicts))
        self._generation = GENERATION[0]
        self._hook_dicts = hook_dicts(self._module_list)
        self._own_hook_dicts = hook_dicts([self])
        self._settings = traced_settings(self._module_list, self._forward_state)
        self._tensor_names = self._names_of_tensors()

    def _names_of_tensors(self) -> list[tuple[str, ...]]:
        """Each module's parameter and buffer names (see ``_tensors_renamed``)."""
        return [(*m._parameters, *m._buffers) for m in self._module_list]

    def _tensors_renamed(self) -> bool:
        """Whether a parameter or buffer was added or deleted since the tree was indexed. No
        hook tells of a deletion (``del ens.scale``): a program that fails asks (it would read
        the old one), as ``_check_modules`` does after a registration."""
        return self._names_of_tensors() != self.__dict__.get("_tensor_names")

    def _check_modules(self, compiling: bool) -> None:
        """Re-index after a submodule was replaced, added or removed, or a parameter or buffer
        added or removed (a forward may ask ``hasattr(self, "shift")``). Eager calls come here
        only when a registration happened somewhere in the process (see ``_tree``) or a child
        dict shrank; under torch.compile every call does, so that dynamo guards on the tree
        itself."""
        generation = GENERATION[0]  # read first: a registration during the check is seen next
        if (
            any(self._leaf_dicts)
            or list(map(tuple, map(dict.values, self._parent_dicts))) != self._children
            or self._tensors_renamed()  # one added (or deleted)
        ):
            self._reindex_modules()
        elif settings_changed(self._settings):  # traced programs hold the old values
            self._forget_programs()
            self._settings = traced_settings(self._module_list, self._forward_state)
        if not compiling:  # (a side effect strict export would warn of)
            self.__dict__["_generation"] = generation

    def _reindex_modules(self) -> None:
        """After model surgery (``ens.head = ...``, a parametrization registered): check that
        the new tensors are stacked, then forget every program, measurement and remembered
        call built for the old tree (they would run the old modules)."""
        self._check_no_own_parametrization()
        for name, t in [*self._template.named_parameters(), *self._template.named_buffers()]:
            if t.ndim == 0 or t.shape[0] != self._num_members:
                raise EnsembleError(
                    f"'{name}' has shape {tuple(t.shape)}, but an ensemble's tensors lead with the "
                    f"member dim ({self._num_members}): a submodule put in after the ensemble was "
                    "built must hold every member's values stacked (e.g. "
                    "torch.stack([m.weight for m in heads]) for each parameter)"
                )
        use_kernel_layout(self._template)
        self._has_buffers = next(self._template.buffers(), None) is not None
        self._plan = AutoPlan()
        self._forget_programs()
        self._choices.clear()
        self._last_choice = None
        self._index_modules()

    def _check_no_own_parametrization(self) -> None:
        """A parametrization registered on the ensemble itself, of a tensor of the members'
        root module: torch moved the tensor into the ensemble's class, where the members'
        forward cannot read it (``self.w`` on the member's root). Said here, by name, rather
        than as that forward's AttributeError."""
        own = self._modules.get("parametrizations")  # (the template's dict: shared)
        template_class = type(self._template)
        names = [] if not isinstance(own, nn.ModuleDict) else list(own)
        lost = [k for k in names if not isinstance(getattr(template_class, k, None), property)]
        if lost:
            for k in lost:  # torch put the property on the class itself when the template
                # was parametrized already (no class of the ensemble's own made): every
                # Ensemble would have it
                if type(self) is Ensemble and isinstance(Ensemble.__dict__.get(k), property):
                    delattr(Ensemble, k)
            raise EnsembleError(
                f"a parametrization of {lost[0]!r} was registered on the ensemble itself: the "
                f"members' forward reads {lost[0]!r} on their own root module, which no longer "
                "has it. Register it on each model before building the ensemble "
                "(torch.nn.utils.parametrize.register_parametrization(model, "
                f"{lost[0]!r}, ...)); a submodule's tensor can be parametrized through the "
                "ensemble (register_parametrization(ens.<submodule>, ...)). This ensemble "
                "must be built again."
            )

    def _forget_programs(self) -> None:
        """Drop the traced programs and the calls remembered for them."""
        self._fused = FusedPlan(compile_options=self.compile_options)
        self._folded = FoldedPlan()
        self._blocked = BlockedPlan()
        self._native = NativePlan()
        self._fast.clear()

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._index_modules()  # (also for pickles made before these lists existed)

    @classmethod
    def _from_template(
        cls, template: nn.Module, n: int, like: Ensemble | None = None, **options: Any
    ) -> Ensemble:
        """An ensemble around an already stacked ``template`` (its tensors lead with ``n``).

        Options come from ``like`` (another ensemble), else from ``options`` (as in
        ``Ensemble(...)``), else the defaults.
        """
        if like is not None:
            options = {
                "backend": like.backend,
                "randomness": like.randomness,
                "chunk_size": like.chunk_size,
                "compile": like.compile_options if like.compile_options is not None else False,
            }
        ens = cls.__new__(cls)
        nn.Module.__init__(ens)
        ens._configure(
            options.get("backend", "auto"),
            options.get("randomness", "different"),
            options.get("chunk_size"),
            options.get("compile", False),
        )
        unknown = set(options) - {"backend", "randomness", "chunk_size", "compile"}
        if unknown:
            raise EnsembleError(f"unknown Ensemble options {sorted(unknown)}")
        ens._adopt(template, n)
        return ens

    @classmethod
    def from_factory(
        cls,
        factory: Callable[[], nn.Module],
        n: int,
        seed: int = 0,
        **kwargs: Any,
    ) -> Ensemble:
        """Build ``n`` members, member ``i`` as ``factory()`` under ``torch.manual_seed(seed + i)``.

        The global RNG state is restored afterwards. ``kwargs`` go to :class:`Ensemble`.

        Example:
            >>> ens = Ensemble.from_factory(lambda: torch.nn.Linear(8, 1), 16, seed=0)
            >>> len(ens)
            16
        """
        if not isinstance(n, int) or n < 1:
            raise EnsembleError(f"n must be a positive int, got {n!r}")
        devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
        members = []
        with torch.random.fork_rng(devices=devices):
            for i in range(n):
                torch.manual_seed(seed + i)
                members.append(factory())
        return cls(members, **kwargs)

    @classmethod
    def from_checkpoints(
        cls, paths: Sequence[Any], factory: Any, map_location: Any = None, **kwargs: Any
    ) -> Ensemble:
        """One member per ordinary ``state_dict`` checkpoint (``.pt`` or ``.safetensors``).

        See :func:`vensemble.io.from_checkpoints`; pickled code in a file never runs.
        """
        from .io import from_checkpoints

        return from_checkpoints(paths, factory, map_location, **kwargs)

    # ----------------------------------------------------------------------------- members

    def __len__(self) -> int:
        return self._num_members

    @property
    def num_members(self) -> int:
        """The number of members ``N``."""
        return self._num_members

    def _index(self, i: int) -> int:
        # any integer, as for a list: numpy's, a 0-d integer tensor (val_loss.argmin())
        if isinstance(i, bool) or (isinstance(i, Tensor) and i.is_floating_point()):
            raise EnsembleError(f"member index must be an int, got {type(i).__name__}")
        try:
            i = operator.index(i)
        except TypeError:
            raise EnsembleError(f"member index must be an int, got {type(i).__name__}") from None
        if not -self._num_members <= i < self._num_members:
            raise EnsembleError(
                f"member index {i} is out of range for an ensemble of {self._num_members}"
            )
        return i % self._num_members

    def member(self, i: int) -> nn.Module:
        """A standalone module with member ``i``'s current weights and buffers (a copy)."""
        return member_module(self._template, self._index(i))

    def unstack(self) -> list[nn.Module]:
        """All members as standalone modules, in order."""
        return [self.member(i) for i in range(self._num_members)]

    def __iter__(self) -> Iterator[nn.Module]:
        return iter(self.unstack())

    def select(self, indices: Sequence[int] | Tensor) -> Ensemble:
        """A smaller ensemble holding copies of the members at ``indices`` (in that order)."""
        index = torch.as_tensor(list(indices) if not isinstance(indices, Tensor) else indices)
        if index.ndim != 1 or index.numel() == 0 or index.dtype not in (torch.int64, torch.int32):
            raise EnsembleError(f"select needs a non-empty 1-D sequence of ints, got {indices!r}")
        index = torch.tensor([self._index(int(i)) for i in index])
        return Ensemble._from_template(reindex_template(self._template, index), len(index), self)

    def __getitem__(self, key: int | slice) -> Any:
        """``ens[i]`` is ``ens.member(i)``; ``ens[a:b]`` is ``ens.select(range(a, b))``."""
        if isinstance(key, slice):
            return self.select(range(*key.indices(self._num_members)))
        return self.member(key)

    # ----------------------------------------------------------------------------- nn.Module

    def _apply(self, fn: Callable[..., Any], recurse: bool = True) -> Ensemble:
        """``.to()``, ``.double()``, ... . A ``memory_format`` (``ens.to(memory_format=
        torch.channels_last)``, or a model holding the ensemble converted so) lays out each
        *member's* tensors, gradients included, as ``model.to(memory_format=...)`` does for one
        model: torch's own would apply it to the stacked tensors (and raise for 5-d ones)."""
        # torch may swap the parameters in place
        # (torch.__future__.set_swap_module_params_on_conversion), and swap_tensors refuses a
        # tensor that a cached view still refers to
        self._release_views()
        with _memory_format_held(fn) as fmt:
            super()._apply(fn, recurse)
        if fmt is not None:
            self._lay_out_members(fmt)
        return self

    def _release_views(self) -> None:
        """Drop every cached view of the stacked tensors (rebuilt on the next call)."""
        self._fused.release_views()
        for program, *_ in self._fast.values():  # (it may hold programs the plan dropped)
            program.release_views()
        self._blocked.release_views()  # (its blocks mirror the new tensors on the next call)
        self._native.release_views()
        self._fast.clear()

    def _lay_out_members(self, fmt: torch.memory_format) -> None:
        with torch.no_grad():
            for name, t in [*self.named_parameters(), *self.named_buffers()]:
                try:
                    new = in_member_format(t, fmt)
                except ValueError as e:
                    raise EnsembleError(f"'{name}': {e}") from None
                if new is not t:
                    t.data = new
                grad = t.grad if isinstance(t, nn.Parameter) else None
                if grad is not None:
                    t.grad = in_member_format(grad, fmt)
        self._forget_programs()  # (layouts are keyed by strides; the views cached are not)

    def train(self, mode: bool = True) -> Ensemble:
        super().train(mode)
        self._template.training = mode
        return self

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        """Load stacked state: the member's keys, each tensor with a leading dim of ``N``."""
        own = self.state_dict()
        for key, value in state_dict.items():
            if key in own and isinstance(value, Tensor):
                want = own[key].shape
                if value.shape != want:
                    raise EnsembleError(
                        f"state_dict['{key}'] has shape {tuple(value.shape)}, the ensemble expects "
                        f"{tuple(want)} (a leading member dimension of {self._num_members})"
                    )
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def _load_from_state_dict(
        self, state_dict: Any, prefix: str, local_metadata: dict[str, Any], *args: Any
    ) -> None:
        # (reached however the load started: this ensemble's own load_state_dict, or that of
        # a model holding it, a MixedEnsemble, a ShardedEnsemble; before the members' modules
        # load, torch may swap their tensors, and swap_tensors refuses one a view refers to)
        if torch.__future__.get_swap_module_params_on_conversion():
            self._release_views()
        super()._load_from_state_dict(state_dict, prefix, local_metadata, *args)
        if local_metadata.get("assign_to_params_buffers", False):
            # new tensors, maybe in another layout: what was learned of the old is stale
            self._forget_programs()

    # The members' own plain settings on their root module (``self.temperature = 1.0`` in the
    # model's ``__init__``) are the template's, shared by every member (members must agree
    # on them: see ``validate_members``): the ensemble reads and writes them there, so that
    # ``ens.temperature = 0.5`` anneals every member, as ``ens.head.scale = 0.5`` does one
    # level down, instead of setting an attribute no member reads.

    def __getattr__(self, name: str) -> Any:
        """``nn.Module``'s lookup (parameters, buffers, submodules), then a plain setting of
        the member's root module."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            if not self._has_root_setting(name):
                raise
            return getattr(self._template, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if self._has_root_setting(name):
            setattr(self._template, name, value)  # every member's
            self._forget_programs()  # (whichever code reads it: a helper function too)
        else:
            super().__setattr__(name, value)

    def __delattr__(self, name: str) -> None:
        if self._has_root_setting(name):
            delattr(self._template, name)  # every member's
            self._forget_programs()
            self.__dict__.setdefault("_deleted_settings", set()).add(name)  # (set again later)
        else:
            super().__delattr__(name)

    def __dir__(self) -> list[str]:
        template = self.__dict__.get("_template")
        own = super().__dir__()
        if template is None:
            return list(own)
        return sorted({*own, *(k for k in dir(template) if self._has_root_setting(k))})

    def _has_root_setting(self, name: str) -> bool:
        """Whether ``name`` is read and written as the members' root setting (see above): one
        the root module has, or had until it was deleted through the ensemble (``False``
        while the ensemble is being built)."""
        template = self.__dict__.get("_template")
        return (
            template is not None
            and name not in self.__dict__
            and not hasattr(type(self), name)
            and (
                _root_setting(template, name) or name in self.__dict__.get("_deleted_settings", ())
            )
        )

    def __repr__(self) -> str:
        member = textwrap.indent(repr(self._template), "  ").lstrip()
        return (
            f"Ensemble(num_members={self._num_members}, backend={self.backend!r}, "
            f"randomness={self.randomness!r}, chunk_size={self.chunk_size},\n  member={member}\n)"
        )

    def explain(self) -> dict[str, str]:
        """How the most recent call ran, part by part: ``{part: how}``.

        Under ``auto``/``fused`` each traced layer and batched op is listed with its kernel
        ("fused: ...", "vmap", or "per-member loop: <why>"); when the forward could not be
        traced, ``"(fused)"`` says why and vmap's per-submodule loops are listed by path.
        """
        if self.backend == "loop":
            return {"": "backend='loop': every member runs one after another"}
        if self._last_choice is _HOOKED:
            return {
                "": "per-member loop: module hooks are registered, and they see what they would "
                "see in each member alone (fused programs and vmap would skip or batch them)"
            }
        out: dict[str, str] = {}
        if self.backend == "auto" and self._last_choice is not None:
            path, timings = self._last_choice
            measured = ", ".join(
                f"{k} {v * 1e3:.3g} ms" if v < math.inf else f"{k} raised"
                for k, v in timings.items()
            )
            why = (
                f"measured per call: {measured}"
                if timings
                else "deterministic algorithms, a trace, a torch.func transform or a graph "
                "capture: not measured"
            )
            folded = self._folded.last if path == "folded" else None
            what = "" if folded is None else f": {folded.describe()}"
            if path == "blocked":
                what = f": {self._blocked.describe()}"
            if path == "native":
                what = f": {self._native.describe()}"
            out["(auto)"] = f"{path} ({why}){what}; the vectorized path:"
        last = self._fused.last
        if self.backend in ("auto", "fused") and last is not None:
            if isinstance(last, str):
                out["(fused)"] = f"not used: {last}"
            else:
                out.update(last.routes)
                if self.compile_options is not None:
                    warm = None if last.warmup_s is None else f"warm-up {last.warmup_s:.2f} s"
                    done = warm or "pending"
                    eager = {
                        "blocked": "the blocks run",
                        "native": "the native kernel runs",
                        "eager": "the fused program runs",
                    }
                    ran = (
                        eager.get((self._last_choice or ("",))[0])
                        if self.backend == "auto"
                        else None
                    )
                    if ran is not None:
                        done = f"{ran} eagerly (the vectorized path, measured compiled: "
                        done += f"{warm or 'not compiled yet'})"
                    out["(compile)"] = f"torch.compile {self.compile_options}: {done}"
                return out
        out.update(
            {
                path or "(whole model)": f"per-member loop: {why}"
                for path, why in self._plan.reasons.items()
            }
        )
        return out

    # ----------------------------------------------------------------------------- forward

    def _in_dims(self, in_dims: Any, args: tuple[Any, ...]) -> tuple[int | None, ...]:
        if in_dims is None:
            return (None,) * len(args)
        if type(in_dims) is int and all(type(a) is Tensor for a in args):  # the common case
            n = self._num_members
            if all(-a.ndim <= in_dims < a.ndim and a.shape[in_dims] == n for a in args):
                return (in_dims,) * len(args)
        if isinstance(in_dims, int):
            dims: tuple[int | None, ...] = (in_dims,) * len(args)
        elif isinstance(in_dims, (tuple, list)):
            if len(in_dims) != len(args):
                raise EnsembleError(
                    f"in_dims has {len(in_dims)} entries but {len(args)} positional arguments were "
                    "given; give one int or None per positional argument"
                )
            dims = tuple(in_dims)
        else:
            raise EnsembleError(f"in_dims must be an int, None or a tuple of them, got {in_dims!r}")
        for k, (arg, d) in enumerate(zip(args, dims)):
            if d is None:
                continue
            if not isinstance(d, int) or isinstance(d, bool):
                raise EnsembleError(f"in_dims[{k}] must be an int or None, got {d!r}")
            leaves = [t for t in pytree.tree_leaves(arg) if isinstance(t, Tensor)]
            if not leaves:
                raise EnsembleError(f"in_dims[{k}] is {d} but argument {k} holds no tensor")
            for t in leaves:
                if not -t.ndim <= d < t.ndim:
                    raise EnsembleError(
                        f"in_dims[{k}] is {d} but argument {k} has only {t.ndim} dims"
                    )
                if t.shape[d] != self._num_members:
                    raise EnsembleError(
                        f"argument {k} has size {t.shape[d]} at dim {d} (in_dims[{k}]={d}) but the "
                        f"ensemble has {self._num_members} members: give one slice per member"
                    )
        return dims

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """``nn.Module.__call__``, which runs hooks around ``forward``, straight to ``forward``
        when it has nothing to add: no hook on the ensemble and no global one, not compiled
        (``Module.compile``), not under torch.compile. On a small ensemble that is 10% of a
        call (10 x MLP 23-256-256-1 at batch 1)."""
        if _is_compiling() or self._compiled_call_impl is not None or hooked(self._own_hook_dicts):
            return nn.Module.__call__(self, *args, **kwargs)
        return self.forward(*args, **kwargs)

    def forward(self, *args: Any, in_dims: Any = None, **kwargs: Any) -> Any:
        """Run every member; outputs are stacked along a new leading dim of size ``N``.

        Args:
            *args: the member's positional inputs.
            in_dims: ``None`` (default: every member sees the same inputs), an int (the dim of
                every positional input that indexes members) or a tuple with one int or
                ``None`` per positional argument, as in ``torch.vmap``.
            **kwargs: passed to every member unchanged.

        Returns:
            The members' outputs stacked: a tensor ``(N, ...)``, or the member's tuple/dict
            structure with each tensor stacked.

        Calls from several threads run one at a time (each takes the ensemble's lock; torch's
        ops inside still use every intra-op thread).
        """
        if _is_compiling():  # (traced by dynamo: the compiled code's own calls take no lock)
            return self._forward(args, in_dims, kwargs)
        lock = self._fast.lock
        # inside another ensemble's member trace (which holds fx's one-trace lock), waiting
        # for this ensemble's lock could wait for good: its holder may be waiting to trace
        if not lock.acquire(blocking=not tracing_now()):
            raise Untraceable("the member calls an ensemble another thread is calling")
        try:
            out = self._forward(args, in_dims, kwargs)
            if self._settings and settings_changed(self._settings):
                self._settings_are_state()
            return out
        finally:
            lock.release()

    def _settings_are_state(self) -> None:
        """Settings that changed during a call of the ensemble are the forward's own state
        (``self.stats["calls"] += 1``, ``self.seen.append(x)``), not settings the user
        changes: no longer watched (each change would forget every program, and a forward
        that changes them on every call would be traced on every call)."""
        self._forward_state = self._forward_state | changed_settings(self._settings)
        self._settings = traced_settings(self._module_list, self._forward_state)

    def _forward(self, args: tuple[Any, ...], in_dims: Any, kwargs: dict[str, Any]) -> Any:
        compiling = _is_compiling()
        if (
            compiling  # (dynamo then guards on the tree itself)
            or GENERATION[0] != self._generation  # something was registered somewhere
            or list(map(len, self._parent_dicts)) != self._child_counts  # or deleted here
            or (self._settings and settings_changed(self._settings))  # a plain value traced
        ):
            self._check_modules(compiling)
        members_hooked = hooked(self._hook_dicts)  # fused programs would skip them
        # eager only: the fast path's programs take shortcuts a trace would record as constants
        fast = not (kwargs or members_hooked or compiling or _jit_tracing())
        if fast:
            last = self._fast.last
            if last is not None and len(args) == 1 and in_dims is None:
                # _fast_key's fields against the latest key's, one by one
                key, entry = last
                x = args[0]
                shape, dtype, device = key[9]
                if (
                    type(x) is Tensor
                    and x.shape == shape
                    and x.dtype is dtype
                    and x.device == device
                    and torch.is_grad_enabled() is key[1]
                    and torch.are_deterministic_algorithms_enabled() is key[2]
                    and self.training is key[3]
                    and self.backend == key[4]
                    and self.randomness == key[5]
                    and self.chunk_size == key[6]
                    and tuple(map(_TRAINING, self._module_list)) == key[7]
                    and torch.is_inference_mode_enabled() is key[8]
                ):
                    out = self._run_fast(entry, args, None)
                    if out is not _MISS:
                        return out
        fast_key = self._fast_key(args, in_dims) if fast else None
        if fast_key is not None:
            found = self._fast.get(fast_key)
            if found is not None:
                out = self._run_fast(found, args, in_dims)
                if out is not _MISS:
                    if in_dims is None and len(args) == 1 and type(args[0]) is Tensor:
                        self._fast.last = (fast_key, found)
                    return out
        call = Call(
            template=self._template,
            n=self._num_members,
            args=args,
            kwargs=kwargs,
            in_dims=self._in_dims(in_dims, args),
            randomness=self.randomness,
            chunk_size=self.chunk_size,
        )
        if self.backend == "loop":
            return loop_forward(call)
        if self.backend == "vmap":
            return strict_vmap_forward(call)
        if members_hooked:  # the members one by one: each hook sees what it sees alone
            self._fused.last = None
            self.__dict__["_last_choice"] = _HOOKED
            return loop_forward(call)
        if self.backend == "auto":
            path = self._choose(call)
            if path == "loop":
                return loop_forward(call)
            if path == "folded":
                return self._folded_loop(call)
            if path == "eager" and not compiling:
                return self._eager(call, fast_key)
            if path in ("blocked", "native") and not compiling:
                if self._chunked:  # (chunk_size set since: the chunks run)
                    self._ran_vectorized()
                elif path == "blocked":
                    return self._in_blocks(call, fast_key)
                else:
                    return self._natively(call, fast_key)
        return self._vectorized(call, fast_key)

    def _eager(self, call: Call, fast_key: tuple[Any, ...] | None = None) -> Any:
        """auto's ``"eager"`` choice with ``compile`` set: the vectorized path without
        torch.compile (measured faster: a small call, where dynamo's guards cost more than the
        compiled code saves)."""
        options = self._fused.compile_options
        self._fused.compile_options = None  # (eager calls hold the ensemble's lock)
        try:
            return self._vectorized(call, fast_key)
        finally:
            self._fused.compile_options = options

    # A call repeated with what decided its path unchanged (the inputs' shapes, dtypes and
    # devices, in_dims, grad mode, every module's training flag, the ensemble's options) goes
    # straight to the fused program that ran it: no Call, no signature key, no auto lookup.
    # Each of those costs a microsecond or two, but a batched layer's activations push the
    # interpreter's own data out of cache: on 100 small members they added 10-15% to a call.

    def _fast_key(self, args: tuple[Any, ...], in_dims: Any) -> tuple[Any, ...] | None:
        """What the fast path is keyed on; ``None`` where it does not apply (``in_dims`` is a
        tuple, an input is not a tensor, a torch.func transform runs the call; the caller has
        checked that no module hook is registered and that neither torch.compile nor
        torch.jit.trace is tracing)."""
        if not (in_dims is None or type(in_dims) is int):
            return None
        if in_func_transform():
            return None  # inside a torch.func transform: auto measured nothing (see _choose)
        described = []
        for a in args:
            if type(a) is not Tensor and type(a) is not nn.Parameter:
                return None
            described.append((a.shape, a.dtype, a.device))
        return (
            in_dims,
            torch.is_grad_enabled(),
            torch.are_deterministic_algorithms_enabled(),
            self.training,
            self.backend,
            self.randomness,
            self.chunk_size,
            # every module's: traced code may read any of them, a child's too
            tuple(map(_TRAINING, self._module_list)),
            torch.is_inference_mode_enabled(),  # (as traced code may: see fused.program_for)
            *described,
        )

    def _run_fast(self, entry: _FastEntry, args: tuple[Any, ...], in_dims: int | None) -> Any:
        """Run a remembered fused program; ``_MISS`` when it raised (the buffers are restored,
        and the full path then decides what the failure means)."""
        program, choice, save_buffers, run = entry
        saved = copy_buffers(self._template) if save_buffers else None
        dynamic = args if not in_dims else tuple([a.movedim(in_dims, 0) for a in args])
        try:
            out = contiguous_outputs(run(*dynamic))
        except Exception:
            if saved is not None:
                restore_buffers(self._template, saved)
            self._fast.clear()
            return _MISS
        self._fused.last = program
        self.__dict__["_last_choice"] = choice  # (nn.Module.__setattr__ costs a microsecond)
        return out

    def _vectorized(self, call: Call, fast_key: tuple[Any, ...] | None = None) -> Any:
        """The fused program where the forward traces; else vmap, looping what vmap cannot run.

        With ``fast_key``, a call signature the fused program ran is remembered for the fast path.
        """
        if self.chunk_size is None or self.chunk_size >= self._num_members:
            snapshot = snapshot_buffers(call) if self._has_buffers else None
            restore_rng = rng_snapshot(state_device(call.state))
            call.remember_input_versions()
            try:
                out = fused_forward(call, self._fused)
            except Untraceable:
                pass  # the reason is kept for explain(); vmap runs it
            except Exception as err:
                if snapshot is not None:
                    call.restore_buffers(snapshot)
                if self._tensors_renamed():  # a deleted one the programs read: traced again
                    self._reindex_modules()
                    restore_rng()
                    return self._vectorized(call, fast_key)
                raise_if_randomness_error(call, err)
                check_loop_runs(call, snapshot, err)
                restore_rng()  # vmap starts from the draws the call started with
                self._fused_failed(err)
            else:
                program = self._fused.last
                if fast_key is not None and isinstance(program, FusedProgram):
                    choice = self._last_choice if self.backend == "auto" else None
                    # (a fast key exists only outside torch.compile: eager here)
                    eager_no_grad = not torch.is_grad_enabled()
                    run = program.runner(self._fused.compile_options, eager_no_grad)
                    self._fast.remember(fast_key, (program, choice, snapshot is not None, run))
                return out
        return auto_forward(call, self._plan)

    @property
    def _chunked(self) -> bool:
        """Whether ``chunk_size`` makes the vectorized path run members in chunks (vmap)."""
        return self.chunk_size is not None and self.chunk_size < self._num_members

    def _in_blocks(self, call: Call, fast_key: tuple[Any, ...] | None) -> Any:
        """auto's ``"blocked"`` choice (see ``backends.blocked``); the vectorized path where
        blocks do not apply now, or raise (the choice is then measured again on the next
        call; a blocked program writes no input, buffer or RNG state, so nothing is undone)."""
        try:
            out, run = blocked_forward(call, self._blocked, self._fused)
        except Exception:  # (Unblockable: the program changed since the choice was measured)
            return self._instead(call, forget=True)
        self._remember_runner(fast_key, run)
        return out

    def _natively(self, call: Call, fast_key: tuple[Any, ...] | None) -> Any:
        """auto's ``"native"`` choice (see ``backends.native``); the vectorized path where the
        kernel does not apply now (the kernel writes nothing but its output, so nothing is
        undone). Where the program is no chain any more, the choice is measured again on the
        next call; under a mode of this call alone (autocast, a trace, a torch.func transform)
        or with tensors or settings the kernel does not take for this call (parameters in
        another layout passed to ``functional_call``), the choice stands. Nothing is remembered
        for the fast path either way."""
        try:
            out, run = native_forward(call, self._native, self._fused)
        except Exception as err:  # (Unfit: this call's mode, tensors or settings)
            return self._instead(call, forget=not isinstance(err, Unfit))  # (or no chain now)
        self._remember_runner(fast_key, run)
        return out

    def _instead(self, call: Call, forget: bool) -> Any:
        """The vectorized path for a call auto chose to run in blocks or through the kernel,
        where that does not apply now; with ``forget``, its choice is measured again on the
        next call. Nothing is remembered for the fast path, which would skip either."""
        if forget:
            self._choices.pop(_shape_key(call, self.training), None)
        self._ran_vectorized()
        return self._vectorized(call)

    def _remember_runner(self, fast_key: tuple[Any, ...] | None, run: Any) -> None:
        """Keep ``run`` (a blocked or native runner) for the fast path of this call's key."""
        program = self._fused.last
        if fast_key is not None and run is not None and isinstance(program, FusedProgram):
            self._fast.remember(fast_key, (program, self._last_choice, False, run))

    def _ran_vectorized(self) -> None:
        """For explain(): a call auto chose to run in blocks or through the compiled kernel
        ran the vectorized path."""
        if self._last_choice is not None:
            self._last_choice = ("vectorized", self._last_choice[1])

    def _folded_loop(self, call: Call) -> Any:
        """auto's ``"folded"`` choice; the plain loop where the folded forward does not apply
        now, or raises (its state restored first: the loop then decides what the error means)."""
        program = folded_program(call, self._folded)
        if program is None:
            return loop_forward(call)
        snapshot = snapshot_buffers(call) if self._has_buffers else None
        try:
            return loop_forward(call, program.module)
        except Exception:
            if snapshot is not None:
                call.restore_buffers(snapshot)
            self._choices.pop(_shape_key(call, self.training), None)  # measured again next time
            return loop_forward(call)

    def _choose(self, call: Call) -> str:
        """``auto``: the vectorized path or the loop, whichever ran this call shape faster.

        Measured once per input shapes, dtypes, devices and mode (forward and, when gradients
        are enabled, backward; buffers and RNG state are restored after each timed run). On a
        CPU a convolutional member run member by member often wins: its activations stay in
        cache; when the two are close (within 15%) a CPU takes the loop and a GPU the
        vectorized path (see ``_MARGIN``). Inference calls of a member with an eval-mode
        conv -> BatchNorm pair measure a third path, ``"folded"``: the loop with each such
        BatchNorm folded into its convolution (``backends.folded``). CPU inference calls of
        at least ``2 * MIN_BLOCK`` members measure ``"blocked"`` too: the fused program run
        on blocks of members whose activations stay in cache (``backends.blocked``; it takes
        the vectorized path's place when faster; its blocks run eagerly, with ``compile`` set
        too). CPU inference calls of a chain of ``Linear`` layers and piecewise-linear
        activations measure ``"native"`` too: one compiled C kernel for every member's whole
        chain (``backends.native``; eager as well). With ``compile`` set, the vectorized path
        is timed compiled (its compile comes first, untimed) and eagerly (``"eager"``), so
        compiling never leaves a model slower than the loop or than not compiling. Under
        ``torch.use_deterministic_algorithms(True)`` nothing is timed and the vectorized path
        runs: the paths agree only up to float rounding, and a timed choice may differ from run
        to run (like ``torch.backends.cudnn.benchmark``). Nor under a trace (``make_fx``,
        ``torch.jit.trace``), a dispatch mode or a CUDA graph capture, which would record the
        timed runs (see ``measuring_allowed``), nor inside a ``torch.func`` transform: a choice
        measured before is kept there, else the vectorized path runs.
        """
        if torch.are_deterministic_algorithms_enabled():
            self._last_choice = _UNMEASURED
            return "vectorized"
        key = _shape_key(call, self.training)
        choice = self._choices.recall(key)
        if choice is None:
            # a trace or a capture: nothing measured, or kept; nor inside a torch.func
            # transform (grad, jacrev), where putting the buffers back after a timed run
            # would write into tensors the transform captured, which it refuses
            if not measuring_allowed() or in_func_transform():
                self._last_choice = _UNMEASURED
                return "vectorized"
            snapshot = call.snapshot_buffers()
            put_back_inputs = call.input_keeper()
            held = hold_attributes(self._template)  # (self.calls += 1 in a forward)

            def restore() -> None:
                call.restore_buffers(snapshot)
                put_back_inputs()
                put_back_attributes(held)

            trainable: list[Tensor] = [p for p in self.parameters() if p.requires_grad]
            paths = {
                "vectorized": lambda: self._vectorized(call),
                "loop": lambda: loop_forward(call),
            }
            folded = folded_program(call, self._folded)
            if folded is not None:  # inference with an eval-mode conv -> BatchNorm pair
                paths["folded"] = lambda: loop_forward(call, folded.module)
            device = state_device(call.state) or torch.device("cpu")
            if (
                device.type == "cpu"
                and not torch.is_grad_enabled()
                and self._num_members >= 2 * MIN_BLOCK
                and not self._chunked
            ):  # after "vectorized", whose program it cuts in blocks (with chunk_size set,
                # the vectorized path runs vmap, and the blocks' sizing run would not chunk)
                paths["blocked"] = lambda: blocked_forward(call, self._blocked, self._fused)[0]
            if (
                device.type == "cpu"
                and not torch.is_grad_enabled()
                and not self._chunked
                and may_run(self._template)
            ):
                paths["native"] = lambda: native_forward(call, self._native, self._fused)[0]
            if self.compile_options is not None:  # (small calls: dynamo's guards can cost
                # more than the compiled code saves; 1 x MLP 16-64-64-1: 117 us against 59)
                paths["eager"] = lambda: self._eager(call)
            measure = functools.partial(
                measure_paths,
                paths,
                restore=restore,
                device=state_device(call.state),
                # compiled: an eager call, the compile with its first call, then a warm one
                warmups={"vectorized": 3} if self.compile_options is not None else None,
                # a rewrite that fails is simply not taken; nor is a loop that raises where
                # the vectorized path ran (a forward that modifies a shared input in place
                # breaks the loop's autograd: each member modifies what the last one saved)
                optional=frozenset({"folded", "loop", "blocked", "native", "eager"}),
            )
            try:
                timings = measure(backward_to=trainable if torch.is_grad_enabled() else None)
            except BackwardFailed:
                # a backward the member's own forward would break too (h = sigmoid(z);
                # h += 1 overwrites what sigmoid saved), where the forward ran: the call asks
                # for the forward only, so the forwards are timed alone
                timings = measure(backward_to=None)
            timings.setdefault("loop", math.inf)  # explain() says it raised
            loop = "folded" if timings.get("folded", math.inf) < timings["loop"] else "loop"
            # (a tie: the whole ensemble at once)
            fused = min(
                ("vectorized", "blocked", "native", "eager"), key=lambda p: timings.get(p, math.inf)
            )
            loop_wins = timings[loop] < math.inf and _loop_wins(
                timings[loop], timings[fused], device
            )
            choice = (loop if loop_wins else fused, timings)
            self._choices.remember(key, choice)
        if not _is_compiling():  # (for explain(); a side effect strict export would warn of)
            self._last_choice = choice
        return choice[0]

    def _fused_failed(self, err: Exception) -> None:
        """The fused program raised where the loop does not: use vmap for this signature."""
        reason = (
            f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
        )
        for key, program in self._fused.programs.items():
            if program is self._fused.last:
                self._fused.programs[key] = f"the fused program failed ({reason})"
        self._fused.last = None
        self._fast.clear()
        warnings.warn(
            f"vensemble: the fused path failed ({reason}); this call signature now runs under vmap "
            "(same results, slower).",
            FallbackWarning,
            stacklevel=3,
        )

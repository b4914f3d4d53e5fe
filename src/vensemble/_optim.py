"""MemberOptimizer: any torch optimizer over an ensemble, with per-member hyperparameters."""

from __future__ import annotations

import contextlib
import inspect
import operator
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.optim.optimizer as _torch_optimizer
from torch import Tensor
from torch.optim import Optimizer

from ._errors import EnsembleError
from ._layout import contiguous_order
from .ensemble import Ensemble

__all__ = ["MemberOptimizer"]

# Optimizers whose update of every element depends only on that element's own gradient and
# state (and on per-tensor step counts, which all members share): one optimizer over the
# stacked parameters is exactly N separate ones.
_ELEMENTWISE: frozenset[type[Optimizer]] = frozenset(
    {
        torch.optim.SGD,
        torch.optim.Adam,
        torch.optim.AdamW,
        torch.optim.RMSprop,
        torch.optim.Adagrad,
        torch.optim.Adadelta,
        torch.optim.Adamax,
        torch.optim.NAdam,
        torch.optim.RAdam,
        torch.optim.ASGD,
        torch.optim.Rprop,
    }
)
# Optimizers with a fused CPU/GPU kernel (fastest: on CPU, fused Adam is about twice as fast
# as the default for-loop implementation on small models).
_FUSED: frozenset[type[Optimizer]] = frozenset(
    {torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW, torch.optim.Adagrad}
)
_GROUPS = ("auto", "member")


def _signature_defaults(opt_cls: type[Optimizer]) -> tuple[dict[str, Any], bool]:
    """The constructor's hyperparameter defaults, and whether it takes ``**kwargs``."""
    params = inspect.signature(opt_cls.__init__).parameters
    defaults = {
        k: p.default
        for k, p in params.items()
        if k not in ("self", "params") and p.kind is not inspect.Parameter.VAR_KEYWORD
    }
    var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    return defaults, var_kw


def _plain(value: Any) -> Any:
    """A Python scalar (or tuple of them) from a tensor or NumPy element."""
    if isinstance(value, Tensor):
        return value.item() if value.ndim == 0 else tuple(v.item() for v in value)
    if isinstance(value, (list, tuple)):
        return tuple(_plain(v) for v in value)
    return value.item() if hasattr(value, "item") and not isinstance(value, (int, float)) else value


def _per_member_values(name: str, value: Any, default: Any, n: int) -> list[Any] | None:
    """Member ``i``'s value of hyperparameter ``name`` for each ``i``, or None for a scalar.

    A scalar is one value for all members; a per-member value is a sequence or tensor of
    ``n`` of them. Tuple-valued hyperparameters (``betas``) are per member only as a sequence
    of tuples or a tensor of shape ``(n, k)``.
    """
    tuple_valued = isinstance(default, tuple)
    if hasattr(value, "tolist") and not isinstance(value, Tensor):  # NumPy arrays
        value = value.tolist()
    if isinstance(value, Tensor):
        if value.ndim == 0 or (tuple_valued and value.ndim == 1):
            return None
        if value.ndim != (2 if tuple_valued else 1):
            raise EnsembleError(
                f"hyperparameter {name!r} is a tensor of shape {tuple(value.shape)}; give one "
                f"value or one per member ({n} {'tuples' if tuple_valued else 'values'})"
            )
        values = [_plain(v) for v in value]
    elif isinstance(value, (list, tuple)):
        if tuple_valued and not all(
            isinstance(v, (list, tuple)) or (isinstance(v, Tensor) and v.ndim == 1) for v in value
        ):
            return None
        values = [_plain(v) for v in value]
    else:
        return None
    if len(values) != n:
        raise EnsembleError(
            f"hyperparameter {name!r} has {len(values)} values but the ensemble has {n} members; "
            "give one value for all members or exactly one per member"
        )
    return values


def _runs(keys: list[tuple[Any, ...]], split: bool) -> list[tuple[int, int]]:
    """Maximal runs ``[a, b)`` of consecutive members with equal keys (single members if split)."""
    runs: list[tuple[int, int]] = []
    start = 0
    for i in range(1, len(keys) + 1):
        if i == len(keys) or split or keys[i] != keys[start]:
            runs.append((start, i))
            start = i
    return runs


def _inverse(perm: list[int]) -> list[int]:
    """The permutation that undoes ``perm``."""
    out = [0] * len(perm)
    for i, d in enumerate(perm):
        out[d] = i
    return out


def _view(t: Tensor, where: slice | int, perm: tuple[int, ...] | None) -> Tensor:
    """``t[where]`` seen through ``perm`` (a permutation of ``t``'s dims, member dim first;
    only elementwise optimizers get one, and their ``where`` is always a slice)."""
    view = t if perm is None else t.permute(perm)
    # all members: no slicing (this runs for every parameter at every step)
    full = isinstance(where, slice) and where.start == 0 and where.stop == t.shape[0]
    if full:
        return view
    if t.layout == torch.sparse_coo:  # (a sparse Embedding's gradient: no strided views)
        if isinstance(where, int):
            return view.select(0, where)
        return view.index_select(0, torch.arange(where.start, where.stop, device=t.device))
    return view[where]


class MemberOptimizer(Optimizer):
    """A torch optimizer over an ensemble's stacked parameters, with per-member hyperparameters.

    Every hyperparameter (``lr``, ``weight_decay``, ``momentum``, ``betas``, ...) is either one
    value for all members or a sequence (or tensor) of ``N`` values, member ``i``'s at index
    ``i``. Each member is then trained exactly as by ``opt_cls`` over its own parameters.

    How: when every hyperparameter is shared and the optimizer is elementwise (SGD, Adam,
    AdamW, RMSprop, Adagrad, ...), one optimizer runs over the stacked parameters. Otherwise
    the members are split into maximal runs with equal hyperparameters, and each run is one
    param group whose params are views ``p[a:b]`` of the stacked parameters (non-elementwise
    optimizers such as Adafactor: one group per member, views ``p[i]``); before each step the
    views get the matching slices of the stacked gradients. Updates land in the stacked
    storage, and each run keeps its own optimizer state. The fused kernel is used where the
    optimizer has one for the parameters' device and dtype, else ``foreach``, unless you pass
    ``fused`` or ``foreach`` yourself.

    It is a :class:`torch.optim.Optimizer`: ``torch.optim.lr_scheduler`` schedulers take it
    directly. ``param_groups[g]["members"]`` is the ``range`` of members group ``g`` drives;
    with ``groups="member"`` there is one group per member, so ``LambdaLR`` can take one
    lambda per member. Build it after moving the ensemble to its device.

    Args:
        opt_cls: a :class:`torch.optim.Optimizer` subclass, e.g. ``torch.optim.AdamW``.
        ens: the ensemble whose parameters to train.
        groups: ``"auto"`` (as few param groups as the hyperparameters allow) or ``"member"``
            (one param group per member).
        elementwise: whether ``opt_cls`` updates each element independently (``None``: known
            for the stock torch optimizers; other classes get one param group per member).
        **hyperparameters: ``opt_cls``'s keyword arguments, each a value or ``N`` values.

    Raises:
        EnsembleError: if a per-member hyperparameter does not have ``N`` values (naming the
            hyperparameter, its length and ``N``), a member's value is invalid for
            ``opt_cls`` (naming the member), or ``opt_cls`` has no such hyperparameter.

    Example:
        >>> import torch, vensemble as ve
        >>> ens = ve.Ensemble.from_factory(lambda: torch.nn.Linear(4, 1), 3, seed=0)
        >>> opt = MemberOptimizer(torch.optim.AdamW, ens, lr=[1e-3, 1e-3, 3e-4], weight_decay=0.01)
        >>> [g["members"] for g in opt.param_groups]
        [range(0, 2), range(2, 3)]
        >>> ens(torch.randn(8, 4)).pow(2).mean(dim=(1, 2)).sum().backward()
        >>> opt.step()
        >>> opt.member_lr
        tensor([0.0010, 0.0010, 0.0003], dtype=torch.float64)
    """

    def __init__(
        self,
        opt_cls: type[Optimizer],
        ens: Ensemble,
        *,
        groups: str = "auto",
        elementwise: bool | None = None,
        **hyperparameters: Any,
    ) -> None:
        if not (isinstance(opt_cls, type) and issubclass(opt_cls, Optimizer)):
            raise EnsembleError(
                f"opt_cls must be a torch.optim.Optimizer subclass, got {opt_cls!r}"
            )
        if not isinstance(ens, Ensemble):
            raise EnsembleError(f"ens must be a vensemble.Ensemble, got {type(ens).__name__}")
        if groups not in _GROUPS:
            raise EnsembleError(f"groups must be one of {_GROUPS}, got {groups!r}")
        if opt_cls is torch.optim.LBFGS and len(ens) > 1:
            raise EnsembleError(
                "LBFGS couples all parameters of its single param group (line search, "
                "history), so it cannot train members independently; use one LBFGS per member"
            )
        n = len(ens)
        params = list(ens.parameters())
        if not params:
            raise EnsembleError("the ensemble has no parameters to optimize")
        self.num_members = n
        self.opt_cls = opt_cls
        self._params = params

        defaults, var_kw = _signature_defaults(opt_cls)
        shared: dict[str, Any] = {}
        member: dict[str, list[Any]] = {}
        for name, value in hyperparameters.items():
            if name not in defaults and not var_kw:
                raise EnsembleError(
                    f"{opt_cls.__name__} has no hyperparameter {name!r}; it takes "
                    f"{', '.join(defaults)}"
                )
            per_member = _per_member_values(name, value, defaults.get(name), n)
            if per_member is None:
                shared[name] = value
            else:
                member[name] = per_member
        sparse = any(getattr(m, "sparse", False) is True for m in ens._template.modules())
        self._choose_kernel(opt_cls, defaults, shared, params, sparse)
        if elementwise is None:
            elementwise = opt_cls in _ELEMENTWISE

        keys = [tuple(member[k][i] for k in member) for i in range(n)]
        runs = _runs(keys, split=groups == "member" or not elementwise)
        # An elementwise update does not care how elements are arranged: such an optimizer
        # sees each parameter through the permutation of its dims that is contiguous (the
        # ensemble stores Linear weights in-major), so its fused kernel runs without copies.
        perms = [contiguous_order(p) if elementwise else None for p in params]
        # the layout the state is kept in, as state_dict records it (see _state_in_our_layout)
        self._layout = [None if q is None else list(q) for q in perms]
        self._links: list[tuple[Tensor, Tensor, slice | int, tuple[int, ...] | None]] = []
        if len(runs) == 1 and elementwise and not any(perms):
            values = {k: member[k][0] for k in member}  # per-member values, all equal
            self._check_values(opt_cls, shared, values, 0, params[0])
            param_groups: list[dict[str, Any]] = [{"params": params, **values, "members": range(n)}]
        else:
            param_groups = []
            for a, b in runs:
                where: slice | int = slice(a, b) if elementwise else a
                views = [_view(p.detach(), where, perm) for p, perm in zip(params, perms)]
                self._links += [(p, v, where, perm) for p, v, perm in zip(params, views, perms)]
                values = {k: member[k][a] for k in member}
                self._check_values(opt_cls, shared, values, a, params[0])
                param_groups.append({"params": views, **values, "members": range(a, b)})
        try:
            self.optimizer = opt_cls(param_groups, **shared)
        except (ValueError, TypeError) as err:
            raise EnsembleError(f"{opt_cls.__name__}: {err}") from None
        if issubclass(opt_cls, torch.optim.Adagrad) and "initial_accumulator_value" in member:
            # Adagrad fills its state from the constructor's argument, not the group's value
            for group in self.optimizer.param_groups:
                for p in group["params"]:
                    self.optimizer.state[p]["sum"].fill_(group["initial_accumulator_value"])
        # what the views were made over: a parameter whose .data is replaced later
        # (vector_to_parameters, load_state_dict(assign=False) keeps it) gets new views
        self._made_over = [(p.data_ptr(), p.dtype, p.device, p.shape, p.stride()) for p in params]
        self._attached: list[Tensor | None] | None = None  # the gradients the views show
        self._sgd_buffers_complete = not issubclass(opt_cls, torch.optim.SGD)

        # An Optimizer whose groups, state and defaults are the inner optimizer's own (see the
        # properties below): schedulers and user code that edit param_groups edit the inner one.
        self._optimizer_step_pre_hooks = OrderedDict()
        self._optimizer_step_post_hooks = OrderedDict()
        self._optimizer_state_dict_pre_hooks = OrderedDict()
        self._optimizer_state_dict_post_hooks = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks = OrderedDict()
        self._optimizer_load_state_dict_post_hooks = OrderedDict()
        self._patch_step_function()

    @staticmethod
    def _choose_kernel(
        opt_cls: type[Optimizer],
        defaults: dict[str, Any],
        shared: dict[str, Any],
        params: list,
        sparse: bool,
    ) -> None:
        """Pick the fused kernel where it exists for these parameters, else foreach; neither
        where a module makes sparse gradients (``Embedding(sparse=True)``): torch then picks
        per step, as for a plain optimizer (the fused and foreach kernels refuse them)."""
        if "fused" in shared or "foreach" in shared or shared.get("differentiable") or sparse:
            return
        devices = torch.utils._foreach_utils._get_fused_kernels_supported_devices()
        fusable = all(p.is_floating_point() and p.device.type in devices for p in params)
        if opt_cls in _FUSED and "fused" in defaults and fusable:
            shared["fused"] = True
        elif "foreach" in defaults:
            shared["foreach"] = True

    @staticmethod
    def _check_values(
        opt_cls: type[Optimizer],
        shared: dict[str, Any],
        values: dict[str, Any],
        member: int,
        like: Tensor,
    ) -> None:
        """torch validates constructor arguments only: validate each run's values the same way."""
        if not values:
            return
        # shaped as a member's own parameter (Muon takes 2-D parameters only)
        dummy = torch.zeros_like(like[0]).requires_grad_(True)
        try:
            opt_cls([dummy], **shared, **values)
        except (ValueError, TypeError) as err:
            given = ", ".join(f"{k}={v!r}" for k, v in values.items())
            raise EnsembleError(
                f"member {member}'s hyperparameters ({given}) are invalid for "
                f"{opt_cls.__name__}: {err}"
            ) from None

    # The inner optimizer's attributes, read and written through (its load_state_dict replaces
    # its param_groups list, so a copied reference would go stale).
    @property
    def param_groups(self) -> list[dict[str, Any]]:
        # the views hold the current gradients whenever someone looks (GradScaler.unscale_,
        # clipping over the groups, step hooks), not only during step()
        self._attach_grads()
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self.optimizer.param_groups = value

    @property
    def state(self) -> Any:
        return self.optimizer.state

    @state.setter
    def state(self, value: Any) -> None:
        self.optimizer.state = value

    @property
    def defaults(self) -> dict[str, Any]:
        return self.optimizer.defaults

    @defaults.setter
    def defaults(self, value: dict[str, Any]) -> None:
        self.optimizer.defaults = value

    # ----------------------------------------------------------------------------- stepping

    def _check_storage(self) -> None:
        """Point the views at the parameters' current data when it was replaced (same dtype,
        device and shape); refuse anything else, naming the parameter."""
        for k, (p, made) in enumerate(zip(self._params, self._made_over)):
            if p.data_ptr() == made[0]:
                continue
            if (p.dtype, p.device, p.shape) != made[1:4]:
                raise EnsembleError(
                    f"parameter {k} of the ensemble changed from {made[1]} on {made[2]} with "
                    f"shape {tuple(made[3])} to {p.dtype} on {p.device} with shape "
                    f"{tuple(p.shape)} after the MemberOptimizer was built: build the optimizer "
                    "after moving or converting the ensemble"
                )
            if p.stride() != made[4]:
                # new data in another layout (vector_to_parameters gives the member's own):
                # back to the one the optimizer state was made in, since the fused kernels
                # pair a parameter's elements with its state's by position in memory
                laid = torch.empty_strided(p.shape, made[4], dtype=p.dtype, device=p.device)
                p.data = laid.copy_(p.detach())
            for q, view, where, perm in self._links:
                if q is p:
                    view.data = _view(p.detach(), where, perm)
            self._made_over[k] = (p.data_ptr(), *made[1:5])

    def _attach_grads(self) -> None:
        """Give the views the stacked parameters' current gradients (again only when one of
        them is a new tensor: in-place accumulation shows through the views), over the
        parameters' current data (see :meth:`_check_storage`)."""
        if not self._links:
            return
        self._check_storage()
        grads = [p.grad for p in self._params]
        attached = self._attached
        if (
            attached is not None
            and all(map(operator.is_, grads, attached))
            # (a sparse gradient's slices are copies: accumulated into, they would not show it)
            and not any(g is not None and g.layout != torch.strided for g in grads)
        ):
            return
        for k, (p, g) in enumerate(zip(self._params, grads)):
            # a gradient set by hand in another layout (torch.autograd.grad's are contiguous,
            # the in-major weights are not) is laid out as its parameter: the fused kernels
            # read a parameter and its gradient in one order
            if g is not None and g.layout is torch.strided and g.stride() != self._made_over[k][4]:
                grads[k] = p.grad = torch.empty_like(p).copy_(g)
        by_id = {id(p): g for p, g in zip(self._params, grads)}
        for param, view, where, perm in self._links:
            stacked = by_id[id(param)]
            view.grad = None if stacked is None else _view(stacked, where, perm)
        self._attached = grads

    def _detach_grads(self) -> None:
        for _, view, _, _ in self._links:
            view.grad = None
        self._attached = None

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One update of every member (the views' gradients are the stacked ones' slices).

        Step hooks and the profiler's ``Optimizer.step#MemberOptimizer.step`` range work as for
        any optimizer; torch's wrapper that provides them runs only when one of them is in use
        (its profiler range alone cost ~30 us per step, 2% of a small ensemble's step).
        """
        if self._needs_step_wrapper():
            return self._wrapped_step(closure)
        return self._step(closure)

    step.hooked = True  # type: ignore[attr-defined]  # Optimizer: "do not wrap step again"

    def _needs_step_wrapper(self) -> bool:
        return bool(
            self._optimizer_step_pre_hooks
            or self._optimizer_step_post_hooks
            or getattr(_torch_optimizer, "_global_optimizer_pre_hooks", True)
            or getattr(_torch_optimizer, "_global_optimizer_post_hooks", True)
            or torch.autograd._profiler_enabled()
        )

    def _step(self, closure: Callable[[], Any] | None = None) -> Any:
        if not self._links:
            with self._fused_sgd_workaround():
                return (
                    self.optimizer.step(closure) if closure is not None else self.optimizer.step()
                )
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._attach_grads()
        try:
            # the inner step itself: this step's own wrapper has run the hooks and the profiler
            # range already when they are in use
            step = type(self.optimizer).step
            with self._fused_sgd_workaround():
                getattr(step, "__wrapped__", step)(self.optimizer)
        finally:
            self._detach_grads()
        return loss

    def _fused_sgd_workaround(self) -> contextlib.AbstractContextManager[None]:
        """torch's fused SGD with momentum fails (``expected Tensor as element 2``) on a step
        where some parameters with gradients have a momentum buffer and others none yet (a
        head used for the first time): such a step runs on the foreach kernel (the same
        update), as torch's default SGD does. Checked until every parameter has its buffer;
        nothing to do at all on later steps and for other optimizers."""
        if self._sgd_buffers_complete:
            return contextlib.nullcontext()
        return self._foreach_for_mixed_groups()

    @contextlib.contextmanager
    def _foreach_for_mixed_groups(self) -> Iterator[None]:
        mixed = []
        state = self.optimizer.state
        complete = True
        for g in self.optimizer.param_groups:
            if not (g.get("fused") and g.get("momentum")):
                continue
            has = [
                state.get(p, {}).get("momentum_buffer") is not None
                for p in g["params"]
                if p.grad is not None
            ]
            complete &= len(has) == len(g["params"]) and all(has)
            if any(has) and not all(has):
                mixed.append(g)
        self._sgd_buffers_complete = complete
        for g in mixed:
            g["fused"], g["foreach"] = False, True
        try:
            yield
        finally:
            for g in mixed:
                g["fused"], g["foreach"] = True, False

    _wrapped_step = Optimizer.profile_hook_step(_step)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Reset the stacked parameters' gradients (as ``torch.optim.Optimizer.zero_grad``)."""
        for p in self._params:
            if p.grad is None:
                continue
            if set_to_none:
                p.grad = None
            else:
                if p.grad.grad_fn is not None:
                    p.grad.detach_()
                else:
                    p.grad.requires_grad_(False)
                p.grad.zero_()
        self._detach_grads()

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        raise EnsembleError(
            "MemberOptimizer's param groups are fixed by the ensemble and the per-member "
            "hyperparameters; build a new MemberOptimizer instead of adding a group"
        )

    # ----------------------------------------------------------------------------- members

    def member_values(self, name: str) -> list[Any]:
        """Each member's current value of hyperparameter ``name`` (``N`` entries)."""
        out: list[Any] = [None] * self.num_members
        for g in self.param_groups:
            if name not in g:
                raise EnsembleError(f"{self.opt_cls.__name__} has no hyperparameter {name!r}")
            for i in g["members"]:
                out[i] = g[name]
        return out

    @property
    def member_lr(self) -> Tensor:
        """Each member's current learning rate, shape ``(N,)`` (float64)."""
        return torch.tensor([float(v) for v in self.member_values("lr")], dtype=torch.float64)

    # ----------------------------------------------------------------------------- state

    def state_dict(self) -> dict[str, Any]:
        """The inner optimizer's state dict; each group's ``members`` saved as ``[start, stop]``.

        Plain tensors and Python values only: it loads with ``torch.load(weights_only=True)``.
        """
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():  # (as torch's)
            pre_hook(self)
        sd = self.optimizer.state_dict()
        for g in sd["param_groups"]:
            g["members"] = [g["members"].start, g["members"].stop]
        # each parameter's state is kept over its view, whose dims are the parameter's in
        # this order: an optimizer over the same ensemble in another layout (loaded with
        # assign=True: the member's own) reorders them on load
        sd["member_layout"] = [None if q is None else list(q) for q in self._layout]
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            hook_result = post_hook(self, sd)
            if hook_result is not None:
                sd = hook_result
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a :meth:`state_dict` saved from a MemberOptimizer with the same groups."""
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():  # (as torch's)
            hook_result = pre_hook(self, state_dict)
            if hook_result is not None:
                state_dict = hook_result
        saved = state_dict.get("param_groups") if isinstance(state_dict, dict) else None
        if not isinstance(saved, (list, tuple)):
            raise EnsembleError("state_dict has no 'param_groups': not an optimizer state dict")
        ours = [g["members"] for g in self.param_groups]
        theirs = [tuple(g.get("members", (0, self.num_members))) for g in saved]
        if [(r.start, r.stop) for r in ours] != [tuple(t) for t in theirs]:
            raise EnsembleError(
                f"state_dict's param groups cover members {[list(t) for t in theirs]}, this "
                f"optimizer's cover {[[r.start, r.stop] for r in ours]}: build the optimizer "
                "with the same per-member hyperparameters (and groups=) before loading"
            )
        groups = [{**g, "members": range(*t)} for g, t in zip(saved, theirs)]
        state = self._state_in_our_layout(state_dict.get("state", {}), state_dict)
        inner = {k: v for k, v in state_dict.items() if k != "member_layout"}
        self.optimizer.load_state_dict({**inner, "state": state, "param_groups": groups})
        self._sgd_buffers_complete = not issubclass(self.opt_cls, torch.optim.SGD)
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def _state_in_our_layout(self, state: Any, state_dict: dict[str, Any]) -> Any:
        """``state`` (the saved ``{index: {name: value}}``) with each parameter-shaped tensor
        reordered from the saved layout to this optimizer's; refused when a tensor fits
        neither."""
        if not isinstance(state, dict):
            return state
        saved = state_dict.get("member_layout")
        groups = state_dict.get("param_groups") or []
        from_member_optimizer = any(isinstance(g, dict) and "members" in g for g in groups)
        ours = self._layout
        views = [p for g in self.optimizer.param_groups for p in g["params"]]
        count = len(self._params)
        out: dict[Any, Any] = {}
        for index, entry in state.items():
            k = int(index) % count
            view = views[int(index)] if int(index) < len(views) else None
            if isinstance(saved, list):
                was = saved[k] if k < len(saved) else ours[k]
            else:  # a plain torch optimizer's file: its state is shaped as the parameters;
                # a MemberOptimizer's from before member_layout was saved: in our layout
                was = ours[k] if from_member_optimizer else None
            if not isinstance(entry, dict) or view is None:
                out[index] = entry
                continue
            fixed = {}
            now = ours[k]
            natural = list(view.shape) if now is None else [view.shape[d] for d in _inverse(now)]
            saved_shape = natural if was is None else [natural[d] for d in was]
            for name, value in entry.items():
                if isinstance(value, Tensor) and value.ndim == view.ndim and value.ndim > 0:
                    # parameter-shaped state (moments) follows the layout; other state
                    # (Adafactor's factored row and column statistics) passes as it is
                    if was != now and list(value.shape) == saved_shape:
                        flat = value if was is None else value.permute(_inverse(was))
                        value = (flat if now is None else flat.permute(now)).contiguous()
                    elif value.numel() == view.numel() and value.shape != view.shape:
                        raise EnsembleError(
                            f"state_dict's '{name}' for parameter {k} has shape "
                            f"{tuple(value.shape)}, this optimizer's parameter view "
                            f"{tuple(view.shape)}: it was saved for another ensemble or layout"
                        )
                fixed[name] = value
            out[index] = fixed
        return out

    def __repr__(self) -> str:
        return (
            f"MemberOptimizer({self.opt_cls.__name__}, num_members={self.num_members}, "
            f"param_groups={len(self.param_groups)})"
        )

"""Noticing model surgery cheaply: a process-wide count of module, parameter and buffer
registrations.

``nn.Module`` calls torch's global registration hooks whenever a submodule, parameter or
buffer is assigned or registered (``ens.head = ...``, ``register_parametrization``,
``ModuleList.append``), before storing it. An ensemble compares its module tree with what it
held only when this count moved since its last look: one integer comparison per call instead
of a pass over every module's child dict (8 us on a 6-module MLP once a batched layer has pushed
them out of the CPU's cache).

The count moves on any registration in the process, the ensemble's or not; the next call then
compares the tree once (about 0.5 us). A submodule deleted (``del m.child``, which calls no
hook) shrinks its parent's child dict: each call compares those dicts' lengths too.
"""

from __future__ import annotations

import dis
import functools
import itertools
import operator
import types
from collections.abc import Iterator
from typing import Any

import torch
from torch.nn.modules import module as _module

__all__ = ["GENERATION", "changed_settings", "settings_changed", "traced_settings"]

GENERATION = [0]  # a list, so that readers hold the one mutable cell


def _bump(*_: Any) -> None:
    # returns None: the registered value is kept as given. Not while dynamo traces: it would
    # guard on the count, and any compiled model that assigns a buffer in its forward would
    # recompile on every call (an ensemble under torch.compile compares its tree each call)
    if not torch.compiler.is_compiling():
        GENERATION[0] += 1


_module.register_module_module_registration_hook(_bump)
_module.register_module_parameter_registration_hook(_bump)
_module.register_module_buffer_registration_hook(_bump)


# --- plain settings of the modules a trace reads through ------------------------------------
# A fused or folded program is an fx trace of the members' own forwards: fx writes the plain
# values it reads there (``self.temperature``, ``self.scale``, ``self.cfg["tau"]``) into the
# program. torch's own layers are not traced through (the fused layers read their settings at
# each call); the code of the modules of other classes is, and what it reads is watched: the
# names their methods mention, on any module of the tree (a parent's forward may read
# ``self.fc.scale``; on torch's layers only the attributes torch's code does not set itself),
# and one level into a small container setting (a config dict's values, a dataclass's or
# namespace's fields, a list's or set's items). What the forward itself changes is its
# state, not a setting: the ensemble stops watching what changes during its own calls.

# (module.__dict__, name, value, what the value held one level down or None)
Setting = tuple[dict[str, Any], str, Any, "tuple[Any, ...] | None"]


def traced_settings(
    modules: list[torch.nn.Module], state: frozenset[tuple[int, str]] = frozenset()
) -> list[Setting]:
    """``(module.__dict__, name, value, held)`` for each plain (non-tensor, non-module)
    attribute of ``modules`` that the code of a module whose forward a trace reads through
    names (its class's methods other than ``__init__`` and the dunder and ``extra_repr`` ones:
    ``self.temperature`` yes, a size used only to build the layers no); ``held`` is what a
    container value holds (see ``_held``). Each call compares them, so the fewer the cheaper.
    Not settings: a module's own forward's bookkeeping (what it assigns to ``self``), what
    torch's code sets on its own layers, and ``state`` (``(id(module.__dict__), name)`` pairs:
    what changed during a call)."""
    read = frozenset().union(*{_names_of(m)[0] for m in modules if not _torchs(m)})
    return [
        (m.__dict__, name, value, _held(value))
        for m in modules
        for name, value in m.__dict__.items()
        if name in read
        and name not in _INTERNALS
        and name not in _names_of(m)[1]
        and (id(m.__dict__), name) not in state
        and not issubclass(type(value), (torch.Tensor, torch.nn.Module))  # (a proxy's own)
    ]


_INTERNALS = frozenset(torch.nn.Module().__dict__) | {"training"}


def _torchs(m: torch.nn.Module) -> bool:
    """Whether ``m`` is one of torch's own layers (not traced through)."""
    return type(m).__module__.startswith("torch.")


def _names_of(m: torch.nn.Module) -> tuple[frozenset[str], frozenset[str]]:
    """What ``m``'s code reads, and what is not a setting of ``m``: for torch's own layers,
    what torch's code sets on them; else what its forward assigns (see :func:`_names_read`)."""
    names = _names_read(type(m))  # type: ignore[arg-type]  # (a class is hashable)
    return (frozenset(), names[2]) if _torchs(m) else names[:2]


# methods whose names say nothing of what a forward reads (a repr names every size)
_NOT_READ_IN_FORWARD = ("extra_repr",)


@functools.lru_cache(maxsize=1024)
def _names_read(cls: type) -> tuple[frozenset[str], frozenset[str], frozenset[str]]:
    """Every name the methods of ``cls`` and its bases mention (their code objects'
    ``co_names``, nested functions' included; not ``__init__``, the other dunder methods or
    ``extra_repr``), less what its ``forward`` assigns to ``self`` (``self.x = ...``,
    ``self.x += ...``: its own state, not a setting); that set of assigned names; and every
    name torch's own classes among them assign (``self.x = ...`` in any method,
    ``__init__`` too: a torch layer's own attributes). ``nn.Module``'s own are left out (its
    internals: see ``_INTERNALS``); of torch's layers, the public ones: a subclass of one
    (``class MyLeaky(nn.LeakyReLU)``) is traced through, and its settings with it
    (``negative_slope``, ``inplace``), but not the layer's bookkeeping, which its methods
    reassign (``nn.LSTM._flat_weights``, on every call that swaps the weights in)."""
    names: set[str] = set()
    stored: set[str] = set()  # what forward assigns: its own state, not a setting
    torchs: set[str] = set()  # what torch's code assigns
    for klass in cls.__mro__:
        if klass is object or klass is torch.nn.Module:
            continue
        public_only = klass.__module__.startswith("torch.")
        for attr, member in vars(klass).items():
            if isinstance(member, (staticmethod, classmethod)):
                member = member.__func__
            funcs = [member.fget, member.fset] if isinstance(member, property) else [member]
            for f in funcs:
                code = getattr(f, "__code__", None)
                for c in _code_objects(code) if isinstance(code, types.CodeType) else ():
                    assigned = {
                        i.argval for i in dis.get_instructions(c) if i.opname == "STORE_ATTR"
                    }
                    if public_only:
                        torchs.update(assigned)
                    if attr.startswith("__") or attr in _NOT_READ_IN_FORWARD:
                        continue
                    names.update(n for n in c.co_names if not (public_only and n[0] == "_"))
                    if attr == "forward":  # (self.x = ..., self.x += ...)
                        stored.update(assigned)
    return frozenset(names - stored), frozenset(stored), frozenset(torchs)


def _code_objects(code: types.CodeType) -> Iterator[types.CodeType]:
    """``code`` and the code of the functions, lambdas and comprehensions nested in it."""
    yield code
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from _code_objects(const)


def _held(value: Any) -> tuple[Any, ...] | None:
    """What a container setting holds, one level down: a dict's keys and values, a list's or
    set's items, the fields of an object with a ``__dict__`` or ``__slots__`` (a dataclass, a
    namespace, a config object); ``None`` for anything else (numbers, strings, tuples,
    functions, classes) and for containers of more than ``_MAX_HELD`` entries (a vocabulary:
    each call would copy it), which are watched as one object."""
    kind = type(value)  # (not isinstance: a dead weakref.proxy raises for its __class__)
    try:
        if issubclass(kind, dict):
            held = tuple(itertools.chain.from_iterable(value.items()))
        elif issubclass(kind, (list, set)):
            held = tuple(value)
        elif issubclass(kind, (type, types.ModuleType, types.FunctionType, types.MethodType)):
            return None
        elif isinstance(getattr(value, "__dict__", None), dict):
            held = tuple(itertools.chain.from_iterable(vars(value).items()))
        elif slots := _slots(kind):  # type: ignore[arg-type]  # (a class is hashable)
            held = tuple(getattr(value, name, _GONE) for name in slots)
        else:
            return None
    except Exception:  # (a dead weakref.proxy, an object whose attributes raise)
        return None
    return held if len(held) <= 2 * _MAX_HELD else None


_MAX_HELD = 64


@functools.lru_cache(maxsize=256)
def _slots(cls: type) -> tuple[str, ...]:
    """The ``__slots__`` of ``cls`` and its bases (a ``@dataclass(slots=True)``'s fields)."""
    names: list[str] = []
    for klass in cls.__mro__:
        declared = vars(klass).get("__slots__", ())
        names += [declared] if isinstance(declared, str) else list(declared)
    return tuple(n for n in names if n not in ("__dict__", "__weakref__"))


_GONE = object()


def settings_changed(settings: list[Setting]) -> bool:
    """Whether one of ``settings`` was assigned another object since it was taken (an
    annealed temperature), or a container setting holds other objects (``cfg.tau = 0.5``):
    programs traced with the old values must go."""
    return any(map(_changed, settings))


def changed_settings(settings: list[Setting]) -> frozenset[tuple[int, str]]:
    """The ``(id(module.__dict__), name)`` of each setting that changed (see
    :func:`settings_changed`), as :func:`traced_settings` takes them in ``state``."""
    return frozenset((id(s[0]), s[1]) for s in settings if _changed(s))


def _changed(setting: Setting) -> bool:
    d, name, value, held = setting
    if d.get(name, _GONE) is not value:
        return True
    if held is None:
        return False
    new = _held(value)  # (the same objects, one by one)
    return new is None or len(held) != len(new) or not all(map(operator.is_, held, new))

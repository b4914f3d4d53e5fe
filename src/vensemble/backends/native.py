"""A compiled kernel for chains of ``Linear`` layers and piecewise-linear activations (CPU
inference).

The members of a Q-function ensemble or a deep ensemble of small MLPs are chains: ``Linear``,
``ReLU``, ``Linear``, ... A batched GEMM per layer writes every member's activations to
memory and reads them back for the next layer, and its small GEMMs (1000 x 128x32x32 on
1000 x MLP 8-32-32-1) run well below the CPU's peak. ``_chain.c`` runs each member's whole
chain on tiles of two vectors of rows instead (float32: 32 rows with AVX-512, 16 with AVX2;
a vector's rows and fewer: half the work), its activations in registers and L1, the weights
read in the ensemble's stored (in-major) layout. The vector is as wide as the CPU's registers
(``_chain.c``): a wider one, split by the compiler, ran 15-30x slower than torch's GEMMs.
A batch of at most 8 rows (an agent acting) runs all its rows at once with the outputs in the
vector lanes, each weight read once, where that does less work (layers at least a vector
wide: see ``vensemble_few_rows`` in ``_chain.h``): 10 x MLP 23-256-256-1 at batch 1 took 44 us
against 65 for the vectorized path.
The kernel's per-layer structs are checked and built once and reused while the parameters are
the same tensors on the same memory and the settings the same (see ``_layers_key``). On a
2-core AMD EPYC with AVX-512 (torch 2.13, 2 threads) those 1000 members took 1.9 ms per call
against 3.2-3.5 ms for the fused program run in blocks of members and 4.3-5.4 ms at once; on
one with AVX2 only, 4.1 ms against 6.4 and 8-15.

The C source is compiled on first use with the system's C compiler (``$CC``, else ``cc``:
``-O3 -march=native -fopenmp``) into a cache directory (``$VENSEMBLE_CACHE_DIR``, else
``$XDG_CACHE_HOME/vensemble`` or ``~/.cache/vensemble``), once per source, compiler and CPU:
about a second. Without a compiler the path is simply not offered. ``VENSEMBLE_NATIVE=0``
turns it off.

``auto`` measures this path against the others for CPU calls without autograd (see
``Ensemble._choose``) whose fused program is such a chain: ``nn.Linear`` layers, each followed
by at most one of ``ReLU``, ``LeakyReLU``, ``ReLU6``, ``Hardtanh`` (as modules, or as
``F.relu``, ``torch.relu``, ``x.relu()``, ``F.leaky_relu``, ``F.relu6``, ``F.hardtanh``) and any
number of ``nn.Identity`` and eval-mode ``nn.Dropout``, on one float32 or float64 input, which
may be flattened first (``x.flatten(1)``, ``torch.flatten(x, 1)``, ``nn.Flatten()``: an
image's pixels as features). The layers' settings are read at each call. Results match the loop's up to float rounding: each
output is the bias plus the products summed in input order, with fused multiply-adds.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import math
import numbers
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
import torch.fx as fx
from torch import Tensor, nn

from ._autotune import in_func_transform
from ._call import Call
from ._layers import Fused, _Direct, _Dropout, _Flatten, _Linear
from ._ops import Elementwise, _DimMethod
from .fused import Afresh, FusedPlan, FusedProgram, Memo, program_for

__all__ = [
    "NativePlan",
    "Unfit",
    "Unnative",
    "kernel_library",
    "may_run",
    "native_forward",
]

_SOURCES = ("_chain.c", "_chain.h")
# The widest layer the kernel takes: each thread holds two scratch tiles of the widest
# activation, 2 x 32 rows (AVX-512) x 65536 x 4 bytes = 16 MiB at most (a layer that wide
# gains nothing here anyway: its GEMM is large enough for BLAS)
MAX_WIDTH = 1 << 16
_FUNCTION = {torch.float32: "vensemble_chain_f32", torch.float64: "vensemble_chain_f64"}
# whether a batch of rows runs the outputs in the lanes (see _chain.h), per kernel function
_FEW_ROWS = {name: name.replace("chain", "few_rows") for name in _FUNCTION.values()}
_TILE_ROWS = {name: name.replace("chain", "tile_rows") for name in _FUNCTION.values()}

# activation codes of _chain.c
_NONE, _RELU, _LEAKY, _CLAMP = 0, 1, 2, 3
_NO_ACTIVATION = (_NONE, 0.0, 0.0, 0.0)


class Unnative(Exception):
    """This call cannot run through the compiled kernel (the reason)."""


class Unfit(Unnative):
    """This call's tensors or settings do not fit the kernel (a layout, a dtype, a setting):
    the chain does, and the next call may fit again (``torch.func.functional_call`` with
    parameters in another layout, a setting changed for one call)."""


class _Layer(ctypes.Structure):
    """``Layer`` of ``_chain.c``."""

    _fields_ = [  # (ctypes reads it from the class)
        ("in_features", ctypes.c_int64),
        ("out_features", ctypes.c_int64),
        ("w", ctypes.c_void_p),
        ("w_stride", ctypes.c_int64),
        ("b", ctypes.c_void_p),
        ("b_stride", ctypes.c_int64),
        ("act", ctypes.c_int32),
        ("slope", ctypes.c_double),
        ("lo", ctypes.c_double),
        ("hi", ctypes.c_double),
    ]


def _cache_dir() -> Path:
    base = os.environ.get("VENSEMBLE_CACHE_DIR")
    if base:
        return Path(base) / "kernels"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "vensemble" / "kernels"


def _cpu_identity() -> str:
    """What ``-march=native`` compiles for: the CPU's model and feature flags."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor()
    lines = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags", "Features"))]
    return "\n".join(dict.fromkeys(lines))  # (one line of each kind per distinct CPU)


def _build(compiler: str, source: Path, target: Path) -> str | None:
    """Compile ``source`` into ``target`` (atomically: another process may build it too), with
    the best flags the compiler takes; why not, if it fails."""
    attempts = [
        ["-O3", "-march=native", "-fopenmp"],
        ["-O3", "-fopenmp"],  # (a compiler without -march=native)
        ["-O3"],  # (without OpenMP: one thread)
    ]
    errors = []
    for flags in attempts:
        try:
            with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
                built = Path(tmp) / target.name
                command = [compiler, *flags, "-shared", "-fPIC", "-o", str(built), str(source)]
                done = subprocess.run(command, capture_output=True, text=True, timeout=300)
                if done.returncode == 0:
                    built.chmod(0o755)  # (whatever the umask: see _own)
                    os.replace(built, target)
                    return None
                lines = done.stderr.strip().splitlines()
                errors.append(lines[-1] if lines else f"exit status {done.returncode}")
        except (OSError, subprocess.SubprocessError) as err:
            errors.append(str(err))
    return f"the kernel did not compile ({'; '.join(errors)})"


@functools.cache
def kernel_library() -> ctypes.CDLL | str:
    """The compiled kernel (built into the cache directory on first use), or why not (never
    raises: a call without it runs another path)."""
    try:
        return _load()
    except Exception as err:  # (no home directory, an unreadable cache, sources missing)
        return f"the kernel is not at hand ({type(err).__name__}: {err})"


def _compiler_version(compiler: str) -> str:
    try:
        done = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return ""
    return done.stdout


def _own(path: Path) -> bool:
    """Whether ``path`` is this user's and nobody else may write it (a library loaded from a
    cache directory others can write to would run their code)."""
    st = path.stat()
    mine = not hasattr(os, "getuid") or st.st_uid == os.getuid()
    return mine and not st.st_mode & 0o022


def _load() -> ctypes.CDLL | str:
    if os.environ.get("VENSEMBLE_NATIVE", "1") == "0":
        return "turned off (VENSEMBLE_NATIVE=0)"
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None:
        return f"no C compiler ({os.environ.get('CC', 'cc')} not found)"
    here = Path(__file__).parent
    sources = b"".join((here / name).read_bytes() for name in _SOURCES)
    # (what the build depends on: a fallback without -march=native or OpenMP is cached too,
    # and recurs for the same compiler and CPU)
    identity = "\n".join([compiler, _compiler_version(compiler), _cpu_identity()])
    digest = hashlib.sha256(sources + identity.encode()).hexdigest()
    name = f"chain-{digest[:24]}.so"
    target = _cache_dir() / name
    if target.exists() and not _own(target):  # (someone else's file: this process builds its own)
        target = Path(tempfile.mkdtemp(prefix="vensemble-")) / name
    if not target.exists():
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            writable = os.access(target.parent, os.W_OK | os.X_OK)
        except OSError:
            writable = False
        if not writable:  # (a read-only home: this process builds its own)
            target = Path(tempfile.mkdtemp(prefix="vensemble-")) / name
        failed = _build(compiler, here / "_chain.c", target)
        if failed is not None:
            return failed
    try:
        lib = ctypes.CDLL(str(target))
    except OSError as err:
        return f"the compiled kernel did not load ({err})"
    for symbol in _FUNCTION.values():
        fn = getattr(lib, symbol)
        fn.restype = ctypes.c_int
        fn.argtypes = [
            ctypes.c_int64,
            ctypes.c_int64,
            ctypes.c_void_p,
            ctypes.c_int64,
            ctypes.c_int32,
            ctypes.POINTER(_Layer),
            ctypes.c_void_p,
            ctypes.c_int32,
        ]
        few = getattr(lib, _FEW_ROWS[symbol])
        few.restype = ctypes.c_int
        few.argtypes = [ctypes.c_int64, ctypes.c_int32, ctypes.POINTER(_Layer)]
        tile = getattr(lib, _TILE_ROWS[symbol])
        tile.restype = ctypes.c_int
        tile.argtypes = []
    return lib


# An activation: what it is, read at call time (a module's settings may change)
_Activation = Callable[[], tuple[int, float, float, float]]


def _number(value: Any) -> float:
    """A setting as torch takes it: a Python or numpy int or float (an int within 64 bits);
    torch raises for anything else, so the call runs where it raises too."""
    numpy = type(value).__module__ == "numpy" and isinstance(value, numbers.Real)
    if isinstance(value, bool) or not (isinstance(value, (int, float)) or numpy):
        raise Unfit(f"an activation's setting is {value!r}, not a number torch takes")
    if isinstance(value, int) and not -(2**63) <= value < 2**64:
        raise Unfit(f"an activation's setting {value} does not fit in 64 bits")
    return float(value)


def _clamp(lo: Any, hi: Any) -> tuple[int, float, float, float]:
    lo, hi = _number(lo), _number(hi)
    if not lo <= hi:  # (torch raises for it)
        raise Unfit(f"hardtanh's min_val {lo} is above its max_val {hi}")
    return (_CLAMP, 0.0, lo, hi)


def _from_module(m: nn.Module) -> _Activation | None:
    kind = type(m)
    if kind is nn.ReLU:
        return lambda: (_RELU, 0.0, 0.0, 0.0)
    if kind is nn.LeakyReLU:
        return lambda: (_LEAKY, _number(m.negative_slope), 0.0, 0.0)
    if kind in (nn.Hardtanh, nn.ReLU6):
        return lambda: _clamp(m.min_val, m.max_val)
    if kind is nn.Identity:
        return lambda: _NO_ACTIVATION
    if kind is nn.Dropout:

        def dropout() -> tuple[int, float, float, float]:
            if m.training:
                raise Unfit("a Dropout in training mode draws random numbers")
            return _NO_ACTIVATION

        return dropout
    return None


def _setting(args: tuple[Any, ...], kwargs: dict[str, Any], k: int, name: str, default: Any) -> Any:
    """Argument ``k`` (after the input) of an activation function, by position or name."""
    if len(args) > k:
        return args[k]
    return kwargs.get(name, default)


def _relu(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[int, float, float, float]:
    return (_RELU, 0.0, 0.0, 0.0)


def _leaky(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[int, float, float, float]:
    return (_LEAKY, _number(_setting(args, kwargs, 0, "negative_slope", 0.01)), 0.0, 0.0)


def _hardtanh(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[int, float, float, float]:
    lo = _setting(args, kwargs, 0, "min_val", -1.0)
    return _clamp(lo, _setting(args, kwargs, 1, "max_val", 1.0))


def _relu6(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[int, float, float, float]:
    return (_CLAMP, 0.0, 0.0, 6.0)


F = nn.functional
# function (or Tensor method name) -> its activation from the call's other arguments
_FUNCTIONS: dict[Any, Callable[[tuple[Any, ...], dict[str, Any]], tuple[int, float, float, float]]]
_FUNCTIONS = {
    torch.relu: _relu,
    torch.relu_: _relu,
    F.relu: _relu,
    F.relu_: _relu,
    "relu": _relu,
    "relu_": _relu,
    F.leaky_relu: _leaky,
    F.leaky_relu_: _leaky,
    F.hardtanh: _hardtanh,
    F.hardtanh_: _hardtanh,
    F.relu6: _relu6,
}
_KNOWN_KEYWORDS = {"negative_slope", "min_val", "max_val", "inplace"}


def _activation(node: fx.Node) -> _Activation | str:
    """What an activation node of a fused program computes, or why it is not one."""
    owner = getattr(node.target, "__self__", None)
    if isinstance(owner, (_Direct, _Dropout)):
        found = _from_module(owner.orig)
        return (
            found
            or f"'{type(owner.orig).__name__}' is not a Linear or a piecewise-linear activation"
        )
    target: Any = node.target
    if type(owner) is Elementwise:
        target = owner.target
    elif isinstance(owner, (Fused, nn.Module)):
        return f"'{type(getattr(owner, 'orig', owner)).__name__}' is not in the kernel"
    rule = _FUNCTIONS.get(target) if isinstance(target, str) or callable(target) else None
    name = getattr(target, "__name__", target)
    if rule is None:
        return f"'{name}' is not in the kernel"
    args, kwargs = tuple(node.args[1:]), dict(node.kwargs)
    if set(kwargs) - _KNOWN_KEYWORDS or any(
        isinstance(a, fx.Node) for a in (*args, *kwargs.values())
    ):
        return f"'{name}' takes a tensor or an unexpected argument"
    return lambda: rule(args, kwargs)


@dataclass
class _Step:
    """One ``nn.Linear`` of the template (stacked) and the activations after it."""

    linear: nn.Linear
    activations: list[_Activation] = field(default_factory=list)


@dataclass
class _Chain:
    """What the kernel runs: the steps, after the input flattened from its dim 1 on (a
    ``flatten(1)``, ``nn.Flatten()`` first: an image's pixels as features) or not."""

    steps: list[_Step]
    # None: no flatten; else what checks, at each call, that it is still flatten(1, -1)
    flatten: Callable[[], None] | None = None
    # the last call's kernel structs, while their key (see _layers_key) holds: (key, layers,
    # the last layer's width, what they point into: see _layers)
    laid: tuple[Any, ...] | None = field(default=None, repr=False)


def _fixed_flatten() -> None:
    pass


def _flatten_of(node: fx.Node) -> Callable[[], None] | None:
    """A check that ``node`` is ``flatten(start_dim=1, end_dim=-1)`` of its input (run at
    each call: a module's dims may change), or ``None`` when it is not a flatten."""
    owner = getattr(node.target, "__self__", None)
    module = owner.orig if isinstance(owner, _Flatten) else None
    partial_of = getattr(getattr(node.target, "func", None), "__self__", None)  # (shared input)
    if type(partial_of) is nn.Flatten:
        module = partial_of
    if type(module) is nn.Flatten:
        flatten = module

        def check() -> None:
            if (flatten.start_dim, flatten.end_dim) != (1, -1):
                raise Unfit("the Flatten's dims are not (1, -1)")

        return check
    method = node.op == "call_method" and node.target == "flatten"
    function = node.op == "call_function" and node.target is torch.flatten
    dims = type(owner) is _DimMethod and owner.target == "flatten"  # (a per-member input)
    if not (method or function or dims) or set(node.kwargs) - {"start_dim", "end_dim"}:
        return None
    args = node.args[1:]
    start = args[0] if args else node.kwargs.get("start_dim", 0)
    end = args[1] if len(args) > 1 else node.kwargs.get("end_dim", -1)
    return _fixed_flatten if (start, end) == (1, -1) and len(args) <= 2 else None


def _chain_of(program: FusedProgram) -> _Chain | str:
    """The fused program as Linear layers and activations, or why it is not a chain."""
    nodes = list(program.module.graph.nodes)
    inputs = [n for n in nodes if n.op == "placeholder"]
    if len(inputs) != 1:
        return f"the forward takes {len(inputs)} inputs (the kernel takes one)"
    steps: list[_Step] = []
    last = inputs[0]
    flatten = _flatten_of(nodes[1]) if len(nodes) > 1 and nodes[1].args[:1] == (last,) else None
    if flatten is not None:
        if len(last.users) != 1:
            return f"'{last.name}' is read twice (the kernel runs a chain)"
        last = nodes[1]
        nodes = nodes[1:]
    for node in nodes[1:]:
        if len(last.users) != 1:
            return f"'{last.name}' is read twice (the kernel runs a chain)"
        if node.op == "output":
            if node.args[0] is not last:
                return "the forward returns more than one tensor"
            break
        if node.op != "call_function" or not node.args or node.args[0] is not last:
            return f"'{node.name}' is not a step of a chain"
        owner = getattr(node.target, "__self__", None)
        if isinstance(owner, _Linear):
            if type(owner.orig) is not nn.Linear or len(node.args) != 1 or node.kwargs:
                return f"'{node.name}' is not a plain nn.Linear"
            steps.append(_Step(owner.orig))
        elif not steps:
            return f"'{node.name}' comes before the first Linear"
        else:
            activation = _activation(node)
            if isinstance(activation, str):
                return activation
            steps[-1].activations.append(activation)
        last = node
    if not steps:
        return "no Linear layer"
    return _Chain(steps, flatten)


def _checked(t: Any, what: str, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """``t`` when the kernel may read it as a plain contiguous array of ``shape``."""
    if type(t) not in (Tensor, nn.Parameter) or t.layout != torch.strided:
        raise Unfit(f"{what} is not a plain tensor")
    if t.device.type != "cpu" or t.dtype != dtype:
        raise Unfit(f"{what} is {t.dtype} on {t.device}, not {dtype} on the CPU")
    if tuple(t.shape) != shape:
        raise Unfit(f"{what} has shape {tuple(t.shape)}, not {shape}")
    if not t.is_contiguous() or t.is_neg() or t.is_conj() or t._is_zerotensor():
        raise Unfit(f"{what} is not laid out as the kernel reads it")
    if t.numel() and (
        t.data_ptr() == 0
        or t.untyped_storage().nbytes() < (t.storage_offset() + t.numel()) * t.element_size()
    ):  # (a storage resized, freed, or lazily zero: torch raises; the kernel would read it)
        raise Unfit(f"{what} has no memory of its own size behind it")
    return t


def _act(step: _Step, top: float) -> tuple[int, float, float, float]:
    """The activation after ``step``'s Linear, its settings within ``top`` (the dtype's
    largest value) in magnitude."""
    activations = step.activations
    if not activations:
        return _NO_ACTIVATION
    if len(activations) == 1:  # (the common case, and a ReLU has no settings to check)
        act = activations[0]()
        if act[0] == _RELU or act[0] == _NONE:
            return act
    found = [a() for a in activations]
    real = [a for a in found if a[0] != _NONE]
    if len(real) > 1:
        raise Unfit("two activations in a row")
    act = real[0] if real else _NO_ACTIVATION
    if any(math.isfinite(v) and abs(v) > top for v in act[1:]):  # (torch raises for it)
        raise Unfit(f"an activation's setting is out of the dtype's range (+-{top:g})")
    return act


def _why_not_now() -> str | None:
    """Why the kernel may not run here, now: what autograd records needs torch's ops, and a
    trace, a transform or a mode would not see a kernel that torch does not call."""
    if torch.is_grad_enabled() or fwAD._current_level >= 0:
        return "autograd or forward-mode AD records the call"
    if torch.jit.is_tracing() or torch.compiler.is_compiling():
        return "a trace would not see the kernel"
    if torch._C._len_torch_dispatch_stack() > 0 or torch._C._is_torch_function_mode_enabled():
        return "a dispatch or torch function mode is active (make_fx, fake tensors, a counter)"
    if in_func_transform():
        return "inside a torch.func transform (vmap, grad, jacrev)"
    if torch.is_autocast_enabled("cpu"):
        return "under autocast (the loop's Linear runs in the autocast dtype)"
    return None


def run_chain(
    lib: ctypes.CDLL, chain: _Chain, x: Tensor, n: int, batched: bool, plan: NativePlan
) -> Tensor:
    """The chain for every member: ``x`` ``(n, *lead, in)`` when ``batched``, else ``(*lead,
    in)`` shared; returns ``(n, *lead, out)``. What ran is noted in ``plan.last``."""
    why = _why_not_now()
    if why is not None:
        raise Unfit(why)
    steps = chain.steps
    if chain.flatten is not None:
        chain.flatten()
        if x.ndim < (3 if batched else 2):  # (torch raises for it)
            raise Unfit(f"flatten(1) of an input with {x.ndim - batched} dims")
        x = x.flatten(2 if batched else 1)
    dtype = x.dtype
    if dtype not in _FUNCTION:
        raise Unfit(f"the input is {dtype} (the kernel takes float32 and float64)")
    acts = [_act(step, _TOP[dtype]) for step in steps]  # (the settings: read at each call)
    laid = chain.laid
    if laid is None or laid[0] != _layers_key(_live(steps), n, dtype, acts):
        laid = chain.laid = _layers(steps, n, dtype, acts)
    layers, width = laid[1], laid[2]
    in0 = layers[0].in_features
    lead = tuple(x.shape[1:-1] if batched else x.shape[:-1])
    if x.ndim < (2 if batched else 1) or x.shape[-1] != in0 or (batched and x.shape[0] != n):
        raise Unfit(f"the input has shape {tuple(x.shape)} (the first Linear takes {in0})")
    x = _checked(x.contiguous(), "the input", tuple(x.shape), dtype)
    rows = 1
    for d in lead:
        rows *= d
    y = torch.empty((n, *lead, width), dtype=dtype)
    if rows == 0 or y.numel() == 0:
        return y
    plan.last = (layers, dtype, chain.flatten is not None, rows)
    fn = getattr(lib, _FUNCTION[dtype])
    stride = rows * in0 if batched else 0
    status = fn(n, rows, x.data_ptr(), stride, len(steps), layers, y.data_ptr(), threads())
    if status != 0:
        raise Unfit("the kernel could not allocate its scratch memory")
    return y


_TOP = {dtype: torch.finfo(dtype).max for dtype in _FUNCTION}  # (an activation setting's range)


def _live(steps: list[_Step]) -> list[tuple[int, Any]]:
    """``(id, tensor)`` of each Linear's weight and bias as the template holds them now."""
    out = []
    for step in steps:
        params = step.linear._parameters
        w, b = params["weight"], params["bias"]
        out += [(id(w), w), (id(b), b)]
    return out


def _layers_key(
    tensors: list[tuple[int, Any]],
    n: int,
    dtype: torch.dtype,
    acts: list[tuple[int, float, float, float]],
) -> tuple[Any, ...]:
    """What :func:`_layers` checked and built its structs from: each weight's and bias's
    identity (the structs keep the parameter objects alive, so an id is not reused), memory
    and its size, shape, strides, dtype and sign bit, and the activations' settings exactly
    (``-0.0`` is not ``0.0``, a NaN is itself). About 0.8 us a tensor, where the full check
    costs 3."""
    key: list[Any] = [n, dtype, *[tuple(map(_exactly, act)) for act in acts]]
    for ident, t in tensors:
        if type(t) is not nn.Parameter and type(t) is not Tensor:
            key.append(type(t))  # (None, or something _layers refuses)
        else:
            key += (ident, t.data_ptr(), t.shape, t.stride(), t.dtype, t.is_neg())
            key.append(t.untyped_storage().nbytes())
    return tuple(key)


def _exactly(v: Any) -> Any:
    """A setting as a key: a float by its bits."""
    return v.hex() if type(v) is float else v


def _layers(
    steps: list[_Step], n: int, dtype: torch.dtype, acts: list[tuple[int, float, float, float]]
) -> tuple[Any, ...]:
    """``(key, structs, the last layer's width, what they point into)``: the kernel's
    ``Layer`` structs for ``steps``, their tensors checked, and their key (see
    :func:`_layers_key`), both from one look at each parameter: an alias of it (``detach``),
    which keeps its memory alive while the structs point into it (a parameter given new
    memory in another thread does not free what a running kernel reads) without holding the
    parameter's own tensor (``torch.utils.swap_tensors`` refuses one a view holds)."""
    layers = (_Layer * len(steps))()
    read: list[tuple[int, Any]] = []
    keep: list[Any] = []
    width = None
    for i, step in enumerate(steps):
        params = step.linear._parameters
        w0, b0 = params["weight"], params["bias"]
        w = w0.detach() if isinstance(w0, Tensor) else w0
        b = b0.detach() if isinstance(b0, Tensor) else b0
        read += [(id(w0), w), (id(b0), b)]
        keep += [w0, b0]  # (their ids stay theirs while the key holds them)
        if not isinstance(w, Tensor) or w.ndim != 3:
            raise Unfit(f"Linear {i}'s weight is not a stacked tensor")
        _, out_f, in_f = w.shape
        if max(in_f, out_f) > MAX_WIDTH:
            raise Unfit(f"Linear {i} is wider than {MAX_WIDTH} (scratch memory per thread)")
        if width is not None and in_f != width:
            raise Unfit(f"Linear {i} takes {in_f} features, the last gives {width}")
        width = out_f
        wt = _checked(w.mT, f"Linear {i}'s weight (transposed)", (n, in_f, out_f), dtype)
        bias = None if b is None else _checked(b, f"Linear {i}'s bias", (n, out_f), dtype)
        keep += [wt, bias]
        act, slope, lo, hi = acts[i]
        layers[i] = _Layer(
            in_f,
            out_f,
            wt.data_ptr(),
            in_f * out_f,
            None if bias is None else bias.data_ptr(),
            out_f,
            act,
            slope,
            lo,
            hi,
        )
    return _layers_key(read, n, dtype, acts), layers, width or 0, keep


def threads() -> int:
    """The kernel's thread count: torch's intra-op one."""
    return torch.get_num_threads()


@dataclass
class NativePlan(Afresh):
    """Per fused program signature, its chain (or why it is none)."""

    chains: Memo = field(default_factory=lambda: Memo("kernel chains"))
    # the layers the most recent call ran (sizes and activations; its pointers are not read
    # again), their dtype, whether the input was flattened first and the rows, for explain()
    last: tuple[Any, torch.dtype, bool, int] | None = None

    def release_views(self) -> None:
        """Let go of the tensors the chains' kernel structs point into (``.to()``, a load):
        the next call checks the parameters afresh."""
        for chain in self.chains.values():
            if isinstance(chain, _Chain):
                chain.laid = None

    def describe(self) -> str:
        if self.last is None:
            return "the compiled kernel"
        layers, dtype, flattened, rows = self.last
        parts = ["flatten(1)"] if flattened else []
        for layer in layers:
            parts.append(f"Linear {layer.in_features}->{layer.out_features}")
            if layer.act == _RELU:
                parts.append("relu")
            elif layer.act == _LEAKY:
                parts.append(f"leaky_relu({layer.slope:g})")
            elif layer.act == _CLAMP:
                parts.append(f"hardtanh({layer.lo:g}, {layer.hi:g})")
        chain = ", ".join(parts)
        lib = kernel_library()
        few = getattr(lib, _FEW_ROWS[_FUNCTION[dtype]], None)  # (the library that ran it)
        if few is not None and few(rows, len(layers), layers):
            return (
                f"one compiled kernel runs each member's whole chain on all {rows} rows at once, "
                f"the outputs in the vector lanes, each weight read once ({chain})"
            )
        tile_rows = getattr(lib, _TILE_ROWS[_FUNCTION[dtype]], None)
        tiles = f"tiles of {tile_rows()} rows" if tile_rows is not None else "tiles of rows"
        return (
            f"one compiled kernel runs each member's whole chain on {tiles} (two of the build's "
            f"vectors), the activations in registers and cache ({chain})"
        )


_LEAVES = (
    nn.Linear,
    nn.ReLU,
    nn.LeakyReLU,
    nn.Hardtanh,
    nn.ReLU6,
    nn.Identity,
    nn.Dropout,
    nn.Flatten,
)


def may_run(template: nn.Module) -> bool:
    """Whether a call of ``template`` may be a chain the kernel runs (a quick look at its
    modules, before any program: its layers are ``nn.Linear`` and the activations above, and
    the kernel compiled); :func:`native_forward` decides."""
    if torch.compiler.is_compiling():  # (the kernel never runs inside the caller's compile)
        return False
    leaves = [type(m) for m in template.modules() if not m._modules]
    return (
        nn.Linear in leaves
        and all(kind in _LEAVES for kind in leaves)
        and not isinstance(kernel_library(), str)
    )


def native_forward(
    call: Call, plan: NativePlan, fused: FusedPlan
) -> tuple[Any, Callable[..., Any] | None]:
    """Run ``call`` through the compiled kernel; also returns what runs it again for the fast
    path (tensor input only), or ``None``.

    Raises:
        Unnative: not here (no compiler, not a chain); the caller runs the vectorized path.
        Unfit: not for this call (autograd, forward-mode AD, a trace or a mode, a layout or
            dtype the kernel does not read: see :func:`run_chain`).
    """
    lib = kernel_library()
    if isinstance(lib, str):
        raise Unnative(lib)
    if call.kwargs or len(call.args) != 1 or not isinstance(call.args[0], Tensor):
        raise Unnative("the kernel takes one tensor input")
    program, dynamic, key = program_for(call, fused)
    if isinstance(program, str):
        raise Unnative(program)
    chain = plan.chains.recall(key)
    if chain is None:
        chain = _chain_of(program)
        plan.chains.remember(key, chain)
    if isinstance(chain, str):
        raise Unnative(chain)
    batched, n = call.in_dims[0] is not None, call.n
    out = run_chain(lib, chain, dynamic[0], n, batched, plan)

    def run(x: Tensor) -> Tensor:
        return run_chain(lib, chain, x, n, batched, plan)

    return out, run

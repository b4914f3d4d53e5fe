"""Pick the fastest of several equivalent kernels by a short measurement, cached per shape."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Hashable
from typing import Any, TypeVar

import torch
import torch.utils._pytree as pytree
from torch import Tensor

__all__ = [
    "BackwardFailed",
    "autotune",
    "choices",
    "decide",
    "in_func_transform",
    "measure_paths",
    "measuring_allowed",
    "running_aside_allowed",
]

_CACHE: dict[Hashable, str] = {}
T = TypeVar("T")


def choices() -> dict[Hashable, str]:
    """What was chosen so far: key (op, shapes, dtype, device, ...) -> candidate name."""
    return dict(_CACHE)


def _time(fn: Callable[[], Any], device: torch.device, repeats: int) -> float:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    best = float("inf")
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - start)
    return best


def in_func_transform() -> bool:
    """Whether a ``torch.func`` transform (vmap, grad, jacrev) runs the code now."""
    return torch._C._functorch.maybe_current_level() is not None


def measuring_allowed() -> bool:
    """False where no choice may be timed: under ``torch.use_deterministic_algorithms(True)``,
    ``torch.jit.trace``, a dispatch mode (``make_fx`` and ``torch.export`` tracing, fake
    tensors, ``FlopCounterMode``) or a CUDA graph capture.

    Equivalent kernels agree only up to float rounding, and a timed choice can differ between
    two runs of one program (like ``torch.backends.cudnn.benchmark``). Deterministic mode
    makes every choice a fixed rule, so the same seed gives the same bits. A trace or a
    capture would record every timed run (and a fake tensor's timing means nothing): a
    choice measured before is kept there, else the first candidate is taken and nothing is
    remembered (see :func:`autotune`).
    """
    return not torch.are_deterministic_algorithms_enabled() and running_aside_allowed()


def running_aside_allowed() -> bool:
    """False where a run beside the program (a timed candidate, a member's result looked at
    for its layout) would be recorded into what is being traced, or mean nothing: under
    ``torch.jit.trace``, a dispatch mode (``make_fx``, fake tensors, ``FlopCounterMode``) or a
    CUDA graph capture. True under ``torch.compile``, whose measuring runs eagerly."""
    if torch.jit.is_tracing():
        return False
    if torch.compiler.is_compiling():  # measuring itself runs eagerly (see autotune)
        return True
    return not (
        torch._C._len_torch_dispatch_stack() > 0
        or (torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing())
    )


def decide(key: Hashable, memo: dict[Any, T], measure: Callable[[], T], fixed: T) -> T:
    """A choice made by measurement, in the one order every measured choice follows.

    ``fixed`` under deterministic algorithms (a fixed rule: no timing decides the bits); else
    what ``memo`` holds for ``key`` (also under a trace or a capture, which keep what was
    measured before); else ``fixed`` where :func:`measuring_allowed` is False (nothing
    remembered); else ``measure()``, remembered in ``memo``.
    """
    chosen = _recalled(key, memo, fixed)
    if chosen is not None:
        return chosen
    if not measuring_allowed():
        return fixed
    memo[key] = chosen = measure()
    return chosen


def _recalled(key: Hashable, memo: dict[Any, T], fixed: T) -> T | None:
    """What :func:`decide` takes without measuring: ``fixed`` under deterministic
    algorithms, else ``memo``'s entry for ``key`` (``None`` where there is none). Plain code
    dynamo traces (a guard on that entry)."""
    if torch.are_deterministic_algorithms_enabled():
        return fixed
    return memo.get(key)


def autotune(key: Hashable, candidates: dict[str, Callable[[], Any]], device: torch.device) -> str:
    """The name of the fastest candidate for ``key``; measured once (best of 3 after a warm-up).

    Candidates must compute the same result; they run without gradient tracking while
    measuring. With a single candidate, or under deterministic algorithms, nothing is measured
    and the first candidate is taken (a fixed rule: the order is the preference); where
    :func:`measuring_allowed` is False for another reason (a trace, a capture), a choice
    measured before is kept, else the first candidate is taken and nothing remembered.

    Under ``torch.compile`` a choice made before is read where dynamo traces it (a guard on
    that entry, no graph break); only a key not seen yet leaves the graph to be measured.
    """
    first = next(iter(candidates))
    if len(candidates) == 1:
        return first
    if torch.compiler.is_compiling():
        chosen = _recalled(key, _CACHE, first)
        if chosen is not None:
            return chosen
    return _measured(key, candidates, device, first)


# Measuring runs eagerly even when a call comes from inside torch.compile: dynamo would trace
# the timed runs into the graph (and cannot trace the clock).
@torch.compiler.disable
def _measured(
    key: Hashable, candidates: dict[str, Callable[[], Any]], device: torch.device, first: str
) -> str:
    def measure() -> str:
        with torch.no_grad():
            timings = {}
            for cand, fn in candidates.items():
                fn()  # warm-up
                timings[cand] = _time(fn, device, repeats=3)
        return min(timings, key=timings.__getitem__)

    return decide(key, _CACHE, measure, first)


@torch.compiler.disable
def measure_paths(
    paths: dict[str, Callable[[], Any]],
    restore: Callable[[], None],
    device: torch.device | None,
    repeats: int = 5,
    backward_to: list[Tensor] | None = None,
    warmups: dict[str, int] | None = None,
    optional: frozenset[str] = frozenset(),
) -> dict[str, float]:
    """Seconds per run of each path (best of ``repeats`` interleaved rounds after a warm-up).

    Without ``backward_to`` the paths run without gradient tracking; with it, each run also
    computes the gradients of its outputs with respect to those tensors (``autograd.grad``:
    nothing accumulates in ``.grad``), since training pays for the backward too.

    ``restore`` undoes each run's side effects on the model (BatchNorm running stats); the
    global RNG state is restored too, so measuring changes nothing a later call sees.
    ``warmups``: untimed runs per path before timing (default 1; a compiled path needs its
    compile and its first compiled call behind it). A path in ``optional`` that raises, in its
    warm-up or a timed run, is left out of the result; any other path's error propagates,
    after ``restore`` (and the RNG state) undid the failed run's side effects.
    """
    dev = device or torch.device("cpu")
    cuda = [dev.index or 0] if dev.type == "cuda" else []
    if backward_to:
        paths = {name: _with_backward(fn, backward_to) for name, fn in paths.items()}
    with torch.enable_grad() if backward_to else torch.no_grad():
        failed = set()
        for name, fn in paths.items():
            for _ in range((warmups or {}).get(name, 1)):
                try:
                    with torch.random.fork_rng(devices=cuda):
                        fn()  # warm-up: builds programs, settles kernel choices, compiles
                except Exception:
                    if name not in optional:
                        raise
                    failed.add(name)
                    break
                finally:
                    restore()
        paths = {name: fn for name, fn in paths.items() if name not in failed}

        def timed(name: str) -> float:
            """One timed run of ``name``; ``inf`` for an optional path that raises (it is
            left out then). Its side effects and the RNG state are undone either way."""
            try:
                with torch.random.fork_rng(devices=cuda):
                    return _time(paths[name], dev, repeats=1)
            except Exception:
                if name not in optional:
                    raise
                failed.add(name)
                return math.inf
            finally:
                restore()

        # the second run is the first honest one; a path already far behind is not re-run
        second = {name: timed(name) for name in list(paths)}
        timed_again: set[str] = set()  # (once more, later: a noisy moment may have hit it)
        while True:
            best = min(second.values())
            behind = [
                k
                for k in paths
                if second[k] > _FAR_BEHIND * best and k not in timed_again and k not in failed
            ]
            if not behind:
                break
            for name in behind:
                second[name] = min(second[name], timed(name))
                timed_again.add(name)
        timings = dict(second)
        contenders = [k for k in paths if second[k] <= _FAR_BEHIND * best]
        for _ in range(repeats - 1):  # interleaved rounds: a noisy moment hits every path alike
            for name in contenders:
                if name not in failed:
                    timings[name] = min(timings[name], timed(name))
        timings = {name: t for name, t in timings.items() if name not in failed}
    return timings


# A path this many times slower than the best in each of two runs is out. One run is not
# enough: another process taking the cores for some 30 ms made the vectorized and native paths
# of 10 x MLP 23-256-256-1 at batch 1 measure 15 ms against the loop's 0.44 (they take 0.06
# and 0.13), and auto ran the loop, 6.6x slower, for good.
_FAR_BEHIND = 3.0


class BackwardFailed(Exception):
    """A timed run's backward raised where its forward ran (``h = sigmoid(z); h += 1``
    overwrites what sigmoid saved): the call itself may ask for the forward only."""


def _with_backward(fn: Callable[[], Any], inputs: list[Tensor]) -> Callable[[], Any]:
    def run() -> Any:
        out = fn()
        outs = [t for t in pytree.tree_leaves(out) if isinstance(t, Tensor) and t.requires_grad]
        if outs:
            ones = [torch.ones_like(t) for t in outs]
            try:
                torch.autograd.grad(outs, inputs, grad_outputs=ones, allow_unused=True)
            except Exception as err:
                raise BackwardFailed(f"{type(err).__name__}: {err}") from err
        return out

    return run

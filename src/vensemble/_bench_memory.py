"""Peak memory of one forward call, with and without ``chunk_size``: one subprocess per case."""

from __future__ import annotations

import gc
import json
import os
import re
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = ["MemoryCase", "memory_cases", "run_memory_case", "run_memory_cases"]

WIDTHS = (8, 32, 32, 1)  # the tiny MLP


@dataclass
class MemoryCase:
    """One configuration, measured in a fresh process.

    Attributes:
        runner: ``"loop"`` (standalone members), ``"torch.func"`` (the tutorial's recipe,
            ``vmap(chunk_size=...)``) or ``"vensemble <backend>"``.
        n: members.
        chunk_size: members run at once (``None``: all).
        batch: samples in the one shared batch.
        peak_growth_mb: peak memory during the call above the memory held before it (MiB):
            resident set (CPU: ``VmHWM`` after ``clear_refs``, glibc's mmap threshold fixed
            at 128 KiB) or ``torch.cuda.max_memory_allocated`` (GPU).
        output_mb: the size of the ``(N, B, 1)`` output, which any method must hold.
        error: why the case could not be measured, if it could not.
    """

    runner: str
    n: int
    chunk_size: int | None
    batch: int = 128
    peak_growth_mb: float | None = None
    output_mb: float | None = None
    error: str = ""


def memory_cases(backends: tuple[str, ...], quick: bool = False) -> list[MemoryCase]:
    """4096 tiny members (``quick``: 64), each runner without and with a chunk of 64 (8).

    For ``vensemble auto`` the chunked case is also run at a quarter of the members, so the
    report shows whether the peak grows with the chunk or with N.

    Example:
        >>> [(c.runner, c.n, c.chunk_size) for c in memory_cases(("auto",), quick=True)][:3]
        [('loop', 64, None), ('torch.func', 64, None), ('torch.func', 64, 8)]
    """
    n, chunk, batch = (64, 8, 16) if quick else (4096, 64, 128)
    cases = [MemoryCase("loop", n, None, batch)]
    for runner in ("torch.func", *(f"vensemble {b}" for b in backends if b != "loop")):
        cases += [MemoryCase(runner, n, None, batch), MemoryCase(runner, n, chunk, batch)]
    cases += [
        MemoryCase("vensemble auto", n // 4, None, batch),
        MemoryCase("vensemble auto", n // 4, chunk, batch),
    ]
    return cases


def _kib(field: str) -> int:
    text = Path("/proc/self/status").read_text()
    match = re.search(rf"^{field}:\s+(\d+) kB", text, flags=re.M)
    return int(match.group(1)) if match else 0


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    except OSError:
        return False
    return True


def _forward(case: MemoryCase, device: torch.device) -> tuple[Any, Any]:
    """Build the case's members and return ``(call, input)``; nothing runs yet."""
    from ._bench_workloads import mlp
    from .ensemble import Ensemble

    models = []
    for i in range(case.n):
        torch.manual_seed(i)
        models.append(mlp(WIDTHS).to(device))
    x = torch.randn(case.batch, WIDTHS[0], device=device)
    if case.runner == "loop":
        return (lambda: torch.stack([m(x) for m in models])), x
    if case.runner == "torch.func":
        import copy

        from torch.func import functional_call, stack_module_state, vmap

        params, buffers = stack_module_state(models)
        base = copy.deepcopy(models[0]).to("meta")

        def fmodel(p: Any, b: Any, inp: Any) -> Any:
            return functional_call(base, (p, b), (inp,))

        batched = vmap(fmodel, in_dims=(0, 0, None), chunk_size=case.chunk_size)
        return (lambda: batched(params, buffers, x)), x
    backend = case.runner.split(" ", 1)[1]
    ens = Ensemble(models, backend=backend, chunk_size=case.chunk_size).to(device)
    return (lambda: ens(x)), x


def run_memory_case(case: MemoryCase, device: str = "cpu", threads: int = 2) -> MemoryCase:
    """Measure ``case`` in this process (called in a fresh subprocess by the benchmark)."""
    torch.set_num_threads(threads)
    dev = torch.device(device)
    call, _ = _forward(case, dev)
    gc.collect()
    with torch.no_grad():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
            before = torch.cuda.memory_allocated(dev)
            torch.cuda.reset_peak_memory_stats(dev)
            out = call()
            torch.cuda.synchronize(dev)
            growth = torch.cuda.max_memory_allocated(dev) - before
        else:
            if not _reset_peak_rss():
                case.error = "cannot reset the peak RSS (/proc/self/clear_refs)"
                return case
            before = _kib("VmRSS")
            out = call()
            growth = (_kib("VmHWM") - before) * 1024
    case.peak_growth_mb = growth / 2**20
    case.output_mb = out.numel() * out.element_size() / 2**20
    return case


def _child() -> None:
    spec = json.loads(sys.argv[1])
    case = MemoryCase(**spec["case"])
    try:
        run_memory_case(case, spec["device"], spec["threads"])
    except Exception as err:  # reported, not raised: the parent prints the table
        case.error = f"{type(err).__name__}: {str(err).strip()[:160]}"
    print("VENSEMBLE_MEMORY " + json.dumps(asdict(case)))


def run_memory_cases(
    cases: list[MemoryCase], device: str = "cpu", threads: int = 2, timeout: float = 600.0
) -> list[MemoryCase]:
    """Measure each case in its own Python process (so one peak cannot hide another's)."""
    results = []
    # A fixed glibc mmap threshold: freed large blocks go back to the OS at once, so the peak
    # RSS follows the live tensors instead of what the allocator happened to keep.
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "MALLOC_MMAP_THRESHOLD_": "131072"}
    for case in cases:
        spec = json.dumps({"case": asdict(case), "device": device, "threads": threads})
        code = "from vensemble._bench_memory import _child; _child()"
        try:
            done = subprocess.run(
                [sys.executable, "-c", code, spec],
                capture_output=True,
                text=True,
                timeout=timeout,
                env=env,
            )
        except subprocess.TimeoutExpired:
            results.append(MemoryCase(**{**asdict(case), "error": f"timed out after {timeout} s"}))
            continue
        line = next(
            (ln for ln in done.stdout.splitlines() if ln.startswith("VENSEMBLE_MEMORY ")), None
        )
        if line is None:
            tail = (done.stderr.strip().splitlines() or ["no output"])[-1][:160]
            results.append(MemoryCase(**{**asdict(case), "error": tail}))
        else:
            results.append(MemoryCase(**json.loads(line.split(" ", 1)[1])))
    return results

"""Ranks of a sharded ensemble: who holds which members, and collectives that time out and
name the rank that did not arrive."""

from __future__ import annotations

import atexit
import contextlib
import datetime
import os
from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

from ._errors import EnsembleError

__all__ = [
    "DEFAULT_TIMEOUT",
    "CollectiveError",
    "Comm",
    "block_bounds",
    "block_sizes",
    "destroy_default_group",
]

DEFAULT_TIMEOUT = 300.0  # seconds any rank waits for the others in one collective
_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
_T = TypeVar("_T")


def destroy_default_group() -> None:
    """Destroy the default process group (at exit, when vensemble initialised it)."""
    if dist.is_available() and dist.is_initialized():
        with contextlib.suppress(Exception):  # the peers may be gone: nothing left to clean up
            dist.destroy_process_group()


class CollectiveError(RuntimeError):
    """A collective of a sharded ensemble failed: a rank died, hung or raised before it.

    Attributes:
        collective: what the collective was for (e.g. ``"save: gather '0.weight'"``).
        world_size: the number of ranks.
        ranks: the ranks that never reached the collective (empty if all did, or unknown).
    """

    def __init__(self, message: str, collective: str, world_size: int, ranks: list[int]) -> None:
        super().__init__(message)
        self.collective, self.world_size, self.ranks = collective, world_size, ranks


def block_sizes(n: int, world: int) -> list[int]:
    """Members per rank: contiguous blocks, the first ``n % world`` ranks one larger.

    Example:
        >>> block_sizes(5, 2), block_sizes(7, 3)
        ([3, 2], [3, 2, 2])
    """
    q, r = divmod(n, world)
    return [q + (1 if k < r else 0) for k in range(world)]


def block_bounds(n: int, world: int, rank: int) -> tuple[int, int]:
    """The global member range ``[start, stop)`` rank ``rank`` holds."""
    sizes = block_sizes(n, world)
    start = sum(sizes[:rank])
    return start, start + sizes[rank]


def as_timedelta(timeout: float | datetime.timedelta) -> datetime.timedelta:
    if isinstance(timeout, datetime.timedelta):
        return timeout
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        raise EnsembleError(f"timeout must be a positive number of seconds, got {timeout!r}")
    return datetime.timedelta(seconds=float(timeout))


def _torchrun_env() -> bool:
    return all(v in os.environ for v in _TORCHRUN_VARS)


def local_rank() -> int:
    """``LOCAL_RANK`` (set by torchrun), else the global rank modulo the GPUs on this host."""
    if "LOCAL_RANK" in os.environ:
        return int(os.environ["LOCAL_RANK"])
    count = max(torch.cuda.device_count(), 1)
    return (dist.get_rank() if dist.is_initialized() else 0) % count


class Comm:
    """The ranks' communicator: a process group (or none, for one process) plus diagnosis.

    Every collective goes through :meth:`run`, which first records in the group's store
    that this rank reached collective number ``seq``. When the collective fails (a peer's
    connection closed, or the group's timeout passed), the store tells which ranks never
    reached it, and a :class:`CollectiveError` names them.
    """

    def __init__(self, group: Any, timeout: datetime.timedelta) -> None:
        self.group = group
        self.timeout = timeout
        self.rank = dist.get_rank(group) if group is not None else 0
        self.world = dist.get_world_size(group) if group is not None else 1
        backend = str(dist.get_backend(group)) if group is not None else "none"
        self.backend = backend
        nccl_only = "nccl" in backend and "gloo" not in backend
        self.device = torch.device("cuda", torch.cuda.current_device()) if nccl_only else None
        self.seq = 0
        self._store: Any = None
        if group is not None:
            try:
                self._store = dist.distributed_c10d._get_process_group_store(group)
            except Exception:  # an unusual group: diagnosis falls back to the collective's name
                self._store = None

    @classmethod
    def create(cls, group: Any, timeout: float | datetime.timedelta) -> Comm:
        """The communicator of a new sharded ensemble.

        ``group`` given: that group (its own timeout applies). Otherwise, inside an initialised
        default group: a new group over all its ranks with ``timeout``. Otherwise, under
        torchrun (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT`` set): the default
        group is initialised from those variables (NCCL when CUDA is available, each local
        rank on ``cuda:LOCAL_RANK``; gloo otherwise). Otherwise: one process, no group.
        """
        delta = as_timedelta(timeout)
        if group is not None:
            if not dist.is_initialized():
                raise EnsembleError("group= was given but torch.distributed is not initialised")
            return cls(group, delta)
        if dist.is_initialized():
            default = dist.group.WORLD
            return cls(dist.new_group(timeout=delta, backend=dist.get_backend(default)), delta)
        if not _torchrun_env():
            return cls(None, delta)
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank())
            dist.init_process_group("nccl", timeout=delta, device_id=torch.cuda.current_device())
        else:
            dist.init_process_group("gloo", timeout=delta)
        # The group is ours: take it down before the interpreter does. Left to interpreter
        # shutdown, a rank that finishes first could abort ("terminate called without an
        # active exception") while the backend's threads were still running.
        atexit.register(destroy_default_group)
        return cls(dist.group.WORLD, delta)

    @property
    def main(self) -> bool:
        return self.rank == 0

    # ----------------------------------------------------------------------------- diagnosis

    def _mark(self) -> None:
        if self._store is not None:
            try:
                self._store.set(f"vensemble/arrived/{self.rank}", str(self.seq))
            except Exception:
                self._store = None  # the store is gone: the collective will say so

    def _behind(self) -> list[int] | None:
        """The ranks whose last recorded collective is before this one (None: unknown)."""
        if self._store is None:
            return None
        behind = []
        try:
            for r in range(self.world):
                key = f"vensemble/arrived/{r}"
                seen = int(self._store.get(key)) if self._store.check([key]) else 0
                if seen < self.seq:
                    behind.append(r)
        except Exception:
            return None
        return behind

    def run(self, what: str, fn: Callable[[], _T]) -> _T:
        """Run one collective, turning its failure into a :class:`CollectiveError`."""
        if self.group is None:
            return fn()
        self.seq += 1
        self._mark()
        try:
            return fn()
        except (RuntimeError, ValueError) as err:  # DistError subclasses RuntimeError
            raise self._failure(what, err) from err

    def _failure(self, what: str, err: BaseException) -> CollectiveError:
        cause = " ".join(str(err).split())[:300]
        behind = self._behind()
        where = f"collective #{self.seq} ({what}) failed on rank {self.rank} of {self.world}"
        if behind:
            who = f"rank {behind[0]}" if len(behind) == 1 else f"ranks {behind}"
            why = (
                f"{who} never reached it (a rank that died, raised an error before it, or hung "
                f"for longer than the timeout of {self.timeout.total_seconds():g} s); see the "
                f"output of {who}"
            )
        elif behind == []:
            why = (
                "every rank reached it, so a rank died or stalled during the transfer, or the "
                "ranks sent tensors of different shapes (every rank must make the same calls "
                "with inputs of the same shapes)"
            )
        else:
            why = (
                "the group's store cannot be read, so the rank hosting it (rank 0, at "
                "MASTER_ADDR) has probably died"
            )
        return CollectiveError(f"{where}: {why}. ({cause})", what, self.world, behind or [])

    # ----------------------------------------------------------------------------- collectives

    def _wire(self, t: Tensor) -> Tensor:
        """``t`` on the device the backend sends from (bool as uint8), contiguous."""
        if t.dtype == torch.bool:
            t = t.to(torch.uint8)
        dev = self.device if self.device is not None else torch.device("cpu")
        return t.to(dev).contiguous()

    def all_gather_blocks(self, t: Tensor, sizes: list[int], what: str) -> Tensor:
        """Every rank's block ``(sizes[r], ...)`` concatenated: ``(sum(sizes), ...)`` everywhere.

        Blocks are padded to the largest for the collective and trimmed after; the result is
        on ``t``'s device with ``t``'s dtype. It carries no gradient (see ShardedEnsemble).
        """
        if self.group is None:
            return t
        pad = max(sizes)
        send = self._wire(t.detach())
        if send.shape[0] < pad:  # (pad, ...): this rank's block padded
            send = torch.cat([send, send.new_zeros((pad - send.shape[0], *send.shape[1:]))])
        out = send.new_empty((self.world * pad, *send.shape[1:]))  # (world * pad, ...)
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        self.run(what, lambda: gather(out, send, group=self.group))
        if any(s != pad for s in sizes):
            out = torch.cat([out[r * pad : r * pad + s] for r, s in enumerate(sizes)])
        return out.to(device=t.device, dtype=t.dtype)

    def gather_blocks(self, t: Tensor, sizes: list[int], what: str) -> Tensor | None:
        """Every rank's block concatenated on rank 0 (on the CPU), ``None`` elsewhere."""
        if self.group is None:
            return t.detach().cpu()
        pad = max(sizes)
        send = self._wire(t.detach())
        if send.shape[0] < pad:
            send = torch.cat([send, send.new_zeros((pad - send.shape[0], *send.shape[1:]))])
        bufs = [torch.empty_like(send) for _ in range(self.world)] if self.main else None
        dst = dist.get_global_rank(self.group, 0)
        self.run(what, lambda: dist.gather(send, bufs, dst=dst, group=self.group))
        if bufs is None:
            return None
        return torch.cat([b[:s].cpu() for b, s in zip(bufs, sizes)]).to(t.dtype)

    def all_gather_object(self, obj: Any, what: str) -> list[Any]:
        """Every rank's (picklable) ``obj``, in rank order, on every rank."""
        if self.group is None:
            return [obj]
        out: list[Any] = [None] * self.world
        self.run(what, lambda: dist.all_gather_object(out, obj, group=self.group))
        return out

    def broadcast_object(self, obj: Any, what: str) -> Any:
        """Rank 0's (picklable) ``obj`` on every rank."""
        if self.group is None:
            return obj
        box = [obj]
        src = dist.get_global_rank(self.group, 0)
        self.run(what, lambda: dist.broadcast_object_list(box, src=src, group=self.group))
        return box[0]

    def agree(self, error: str | None, what: str) -> None:
        """All ranks learn whether any failed (``error`` is this rank's message or None);
        each then raises an :class:`EnsembleError` naming the first rank that failed."""
        errors = self.all_gather_object(error, what)
        for r, e in enumerate(errors):
            if e is not None:
                raise EnsembleError(f"{what} failed on rank {r} of {self.world}: {e}")

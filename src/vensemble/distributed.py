"""ShardedEnsemble: an ensemble's members split over the ranks of a torch.distributed group.

Launched with ``torchrun`` (any world size, one or several hosts), each rank builds, runs
and trains a contiguous block of the members; ranks meet only to gather outputs, to share
training logs and validation scores, and to write or read one file. See
``docs/scaling_out.md``.
"""

from __future__ import annotations

import contextlib
import datetime
import itertools
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import Tensor, nn

from ._dist_comm import (
    DEFAULT_TIMEOUT,
    CollectiveError,
    Comm,
    block_bounds,
    block_sizes,
    local_rank,
)
from ._dist_io import load_block, rebuild, save_one_file, save_per_rank
from ._errors import EnsembleError
from ._io_state import PathLike, unique_tensors
from ._layout import restacked_like
from ._root_settings import RootSettings
from .ensemble import Ensemble

__all__ = ["CollectiveError", "ShardedEnsemble", "block_sizes"]

_GOLDEN = 0x9E3779B97F4A7C15  # mixes a block's first member index into its RNG seed


def _default_device(comm: Comm, device: Any) -> torch.device:
    if device is not None:
        return torch.device(device)
    if comm.device is not None:  # NCCL: the rank's own GPU
        return comm.device
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank())
    return torch.device("cpu")


class ShardedEnsemble(RootSettings):
    """``n`` members split over the ranks of a process group: each rank holds a block.

    Rank ``r`` of ``W`` holds the contiguous block of members ``start, ..., stop - 1``
    (``block_sizes(n, W)``: the first ``n % W`` ranks hold one more, e.g. 5 members on 2
    ranks are 3 and 2) as an ordinary :class:`~vensemble.Ensemble`, :attr:`local`. Member
    ``i`` is the same module whatever the world size: ``factory()`` built under
    ``torch.manual_seed(seed + i)``, exactly as in ``Ensemble.from_factory(factory, n, seed)``;
    each rank builds only its own block.

    The process group: ``group`` if given; else, inside an initialised default group, a new
    group over all its ranks with ``timeout``; else, under ``torchrun`` (its environment
    variables set), the default group is initialised with ``timeout`` (NCCL when CUDA is
    available, each local rank on ``cuda:LOCAL_RANK``; gloo on the CPU); else one process
    holds every member (world size 1, no group). Building is collective: every rank must
    build the same shards in the same order.

    Every collective waits at most ``timeout``; when a rank dies, hangs or raises, the other
    ranks raise :class:`CollectiveError` naming the ranks that never reached the collective.

    Randomness: each call draws one number from torch's global RNG (so ranks that seed alike
    stay in step) and runs the local block under a fork of the RNG seeded from that number
    and the block's first global member index: dropout masks differ between ranks' blocks,
    and a seeded run is reproducible at a given world size. The masks of a member depend on
    how the members are split, so training with dropout gives the same members at another
    world size only in distribution (without random ops, training is identical; see
    :func:`vensemble.fit`). With ``randomness="same"`` every rank uses the same seed.

    Gradients: ``shard(x)`` returns all members' outputs; the local block's rows carry
    gradients, the other ranks' rows are constants. So ``member_loss(...).sum().backward()``
    on the gathered output gives each rank exactly its own members' gradients: the members
    need no gradient synchronisation.

    Args:
        factory: a zero-argument function returning one member (``nn.Module``).
        n: the number of members (at least the world size).
        seed: member ``i`` is built under ``torch.manual_seed(seed + i)``.
        group: the process group to shard over (default: see above).
        timeout: seconds (or a ``timedelta``) any collective waits before failing.
        device: where this rank's members live (default: the rank's GPU under NCCL, else
            ``cuda:LOCAL_RANK`` when CUDA is available, else the CPU).
        **ensemble_options: options of the local :class:`~vensemble.Ensemble` (``backend``,
            ``randomness``, ``chunk_size``, ``compile``).

    Raises:
        EnsembleError: ``n`` smaller than the world size, or invalid options.

    Example:
        >>> import torch
        >>> from vensemble.distributed import ShardedEnsemble
        >>> shard = ShardedEnsemble(lambda: torch.nn.Linear(4, 2), 5, seed=0)  # 1 process here
        >>> shard(torch.randn(3, 4)).shape, shard.members
        (torch.Size([5, 3, 2]), range(0, 5))
    """

    local: Ensemble

    def __init__(
        self,
        factory: Callable[[], nn.Module],
        n: int,
        seed: int = 0,
        *,
        group: Any = None,
        timeout: float | datetime.timedelta = DEFAULT_TIMEOUT,
        device: Any = None,
        **ensemble_options: Any,
    ) -> None:
        super().__init__()
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise EnsembleError(f"n must be a positive int, got {n!r}")
        comm = Comm.create(group, timeout)
        self._setup(comm, n)
        devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
        members = []
        with torch.random.fork_rng(devices=devices):
            for i in range(self.start, self.stop):
                torch.manual_seed(seed + i)
                members.append(factory())
        local = Ensemble(members, **ensemble_options).to(_default_device(comm, device))
        self.local = local

    # The members' plain settings on their root module, as on an Ensemble (see RootSettings):
    # ``shard.temperature = 0.5`` sets this rank's block's (every rank must set it alike).
    _BLOCK = "shard.local"

    def _setting_blocks(self) -> list[Ensemble]:
        local = self.__dict__.get("_modules", {}).get("local")
        return [local] if isinstance(local, Ensemble) else []

    def _setup(self, comm: Comm, n: int) -> None:
        if n < comm.world:
            raise EnsembleError(
                f"{n} members cannot be split over {comm.world} ranks: every rank needs at least "
                "one member (use fewer processes or more members)"
            )
        self._comm = comm
        self._num_members = n
        self._sizes = block_sizes(n, comm.world)
        self.start, self.stop = block_bounds(n, comm.world, comm.rank)

    @classmethod
    def _wrap(cls, comm: Comm, n: int, local: Ensemble) -> ShardedEnsemble:
        shard = cls.__new__(cls)
        nn.Module.__init__(shard)
        shard._setup(comm, n)
        if len(local) != shard.stop - shard.start:
            raise EnsembleError(
                f"rank {comm.rank} must hold {shard.stop - shard.start} members, got {len(local)}"
            )
        shard.local = local
        return shard

    # ----------------------------------------------------------------------------- who holds what

    def __len__(self) -> int:
        return self._num_members

    @property
    def num_members(self) -> int:
        """The number of members ``N`` over all ranks."""
        return self._num_members

    @property
    def members(self) -> range:
        """The global indices of this rank's members, ``range(start, stop)``."""
        return range(self.start, self.stop)

    @property
    def rank(self) -> int:
        """This process's rank in the shard's group."""
        return self._comm.rank

    @property
    def world_size(self) -> int:
        """The number of ranks the members are split over."""
        return self._comm.world

    @property
    def block_sizes(self) -> list[int]:
        """Members per rank, in rank order."""
        return list(self._sizes)

    @property
    def device(self) -> torch.device:
        """The device of this rank's members."""
        first = next(itertools.chain(self.local.parameters(), self.local.buffers()), None)
        return first.device if first is not None else torch.device("cpu")

    def local_part(self, values: Sequence[Any] | Tensor) -> Any:
        """This rank's entries of a per-member sequence or tensor of ``N`` values.

        For per-member hyperparameters of the local optimizer, e.g.
        ``MemberOptimizer(torch.optim.AdamW, shard.local, lr=shard.local_part(lrs))``.
        """
        if len(values) != self._num_members:
            raise EnsembleError(
                f"expected one value per member ({self._num_members}), got {len(values)}"
            )
        return values[self.start : self.stop]

    def extra_repr(self) -> str:
        return (
            f"num_members={self._num_members}, rank={self.rank}, world_size={self.world_size}, "
            f"members={self.start}..{self.stop - 1}"
        )

    # ----------------------------------------------------------------------------- forward

    @contextlib.contextmanager
    def _member_rng(self) -> Iterator[None]:
        """Fork the RNG for one call, seeded from one global draw and the block's start."""
        draw = int(torch.randint(0, 2**62, ()))
        seed = draw if self.local.randomness == "same" else (draw + self.start * _GOLDEN) % 2**63
        device = self.device
        cuda = device.type == "cuda"
        cpu_state = torch.get_rng_state()
        cuda_state = torch.cuda.get_rng_state(device) if cuda else None
        try:
            torch.default_generator.manual_seed(seed)
            if cuda:
                torch.cuda.default_generators[device.index or 0].manual_seed(seed)
            yield
        finally:
            torch.set_rng_state(cpu_state)
            if cuda_state is not None:
                torch.cuda.set_rng_state(cuda_state, device)

    def _local_args(self, args: tuple[Any, ...], in_dims: Any) -> tuple[Any, ...]:
        """Each per-member argument narrowed to this rank's members along its member dim."""
        if in_dims is None:
            return args
        dims = (in_dims,) * len(args) if isinstance(in_dims, int) else tuple(in_dims)
        if len(dims) != len(args):
            raise EnsembleError(
                f"in_dims has {len(dims)} entries but {len(args)} positional arguments were given"
            )
        out = []
        for k, (arg, d) in enumerate(zip(args, dims)):
            if d is None:
                out.append(arg)
                continue

            def narrow(t: Any, k: int = k, d: Any = d) -> Any:
                if not isinstance(t, Tensor):
                    return t
                if not isinstance(d, int) or not -t.ndim <= d < t.ndim:
                    raise EnsembleError(f"in_dims[{k}]={d!r} is not a dim of argument {k}")
                if t.shape[d] != self._num_members:
                    raise EnsembleError(
                        f"argument {k} has size {t.shape[d]} at dim {d} (in_dims[{k}]={d}) but the "
                        f"sharded ensemble has {self._num_members} members: give one slice per "
                        "member (all of them; each rank uses its own)"
                    )
                return t.narrow(d, self.start, self.stop - self.start)

            out.append(pytree.tree_map(narrow, arg))
        return tuple(out)

    def forward(self, *args: Any, in_dims: Any = None, gather: bool = True, **kwargs: Any) -> Any:
        """Run the members: all ``N`` outputs on every rank, or (``gather=False``) the block's.

        Args:
            *args: the member's positional inputs. Per-member inputs (``in_dims``) hold all
                ``N`` members' slices; each rank uses its own.
            in_dims: as in :class:`~vensemble.Ensemble`.
            gather: gather every rank's outputs (a collective: every rank must call it).
            **kwargs: passed to every member unchanged.

        Returns:
            Outputs stacked ``(N, ...)`` (``gather=False``: ``(stop - start, ...)``), the
            local rows differentiable, in the member's tuple/dict structure.
        """
        local_args = self._local_args(args, in_dims)
        with self._member_rng():
            out = self.local(*local_args, in_dims=in_dims, **kwargs)
        if not gather:
            return out
        return pytree.tree_map(
            lambda t: (
                self._gather_rows(t, "forward: gather outputs") if isinstance(t, Tensor) else t
            ),
            out,
        )

    def _gather_rows(self, t: Tensor, what: str) -> Tensor:
        """``(N, ...)`` from each rank's ``(block, ...)``; the local rows keep their graph."""
        if self.world_size == 1:  # (the gather sends detached copies: keep the graph)
            return t
        whole = self._comm.all_gather_blocks(t, self._sizes, what)
        if not t.requires_grad:
            return whole
        return torch.cat([whole[: self.start], t, whole[self.stop :]])

    # ----------------------------------------------------------------------------- members

    def to_ensemble(self, indices: Sequence[int] | None = None) -> Ensemble:
        """A plain :class:`~vensemble.Ensemble` of the members at global ``indices`` (default:
        all), in that order, on every rank (a collective; copies, on this rank's device)."""
        wanted = list(range(self._num_members)) if indices is None else list(indices)
        for i in wanted:
            if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < self._num_members:
                raise EnsembleError(
                    f"member index {i!r} is out of range for a sharded ensemble of "
                    f"{self._num_members}"
                )
        if not wanted:
            raise EnsembleError("to_ensemble needs at least one member index")
        rows = sorted(set(wanted))  # gathered in global (= rank) order
        counts = [sum(1 for i in rows if lo <= i < lo + s) for lo, s in self._block_starts()]
        mine = [i - self.start for i in rows if self.start <= i < self.stop]
        local_rows = torch.tensor(mine, dtype=torch.long)
        order = torch.tensor([rows.index(i) for i in wanted], dtype=torch.long)
        tensors = {}
        for name, t in unique_tensors(self.local._template).items():
            block = t.detach().index_select(0, local_rows.to(t.device))  # (this rank's wanted, ...)
            whole = self._comm.all_gather_blocks(block, counts, f"to_ensemble: gather '{name}'")
            tensors[name] = restacked_like(whole.index_select(0, order.to(whole.device)), t)
        template = rebuild(self.local._template, tensors)
        return Ensemble._from_template(template, len(wanted), like=self.local)

    def _block_starts(self) -> list[tuple[int, int]]:
        starts = [sum(self._sizes[:r]) for r in range(self.world_size)]
        return list(zip(starts, self._sizes))

    def explain(self) -> dict[str, str]:
        """How the local block's last call ran (see :meth:`Ensemble.explain`)."""
        return self.local.explain()

    # ----------------------------------------------------------------------------- files

    def save(self, path: PathLike, *, per_rank: bool = False, optimizer: Any = None) -> None:
        """Write all members: one file, or (``per_rank``) one file per rank in a folder.

        A collective. One file (default): each tensor's blocks are gathered to rank 0, which
        writes an ordinary vensemble file atomically (``vensemble.load`` reads it at any world
        size; :meth:`load` re-shards it); rank 0's host memory holds the whole ensemble once.
        ``per_rank=True``: ``path`` is a folder; each rank writes its block as an ordinary
        vensemble file (with ``optimizer``'s state, if given), then rank 0 writes
        ``index.json`` listing the files and their member ranges (the folder must be one
        every rank can see to be re-sharded at another world size).

        If any rank fails, every rank raises and no file (one-file mode) or no index
        (per-rank mode) appears at ``path``.
        """
        if per_rank:
            save_per_rank(self, path, optimizer)
        elif optimizer is not None:
            raise EnsembleError(
                "one file cannot hold the ranks' optimizer states; save with per_rank=True "
                "(each rank's file holds its optimizer's state), or use fit's checkpoints"
            )
        else:
            save_one_file(self, path)

    @classmethod
    def load(
        cls,
        path: PathLike,
        factory_or_module: Callable[[], nn.Module] | nn.Module,
        *,
        n: int | None = None,
        group: Any = None,
        timeout: float | datetime.timedelta = DEFAULT_TIMEOUT,
        device: Any = None,
        **ensemble_options: Any,
    ) -> ShardedEnsemble:
        """Load a file written by ``vensemble.save`` (of an Ensemble or a ShardedEnsemble) or a
        ``per_rank`` folder, re-sharded over this group at any world size.

        Each rank reads only the bytes of its own members (plus whatever checksum chunks
        they share with neighbours, at most 64 MiB per tensor) and checks them against the
        file's CRC-32s; the architecture is checked as in :func:`vensemble.load`. A
        collective: if any rank fails, all raise.
        """
        comm = Comm.create(group, timeout)
        error: str | None = None
        local: Ensemble | None = None
        total = 0
        try:
            template, total = load_block(path, factory_or_module, comm, n)
            start, stop = block_bounds(total, comm.world, comm.rank)
            local = Ensemble._from_template(template, stop - start, **ensemble_options)
            local = local.to(_default_device(comm, device))
        except EnsembleError as e:
            error = str(e)
        comm.agree(error, f"load {path}")
        if local is None:  # unreachable: agree raised
            raise EnsembleError(f"load {path} failed")
        return cls._wrap(comm, total, local)

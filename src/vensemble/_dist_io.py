"""A sharded ensemble in files: one file gathered on rank 0, or one file per rank plus an
index; read back block by block at any world size."""

from __future__ import annotations

import json
import secrets
from contextlib import suppress
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import torch
from torch import Tensor, nn

from ._dist_comm import Comm, block_bounds
from ._errors import EnsembleError
from ._io_format import CHUNK_BYTES, FileInfo, damaged, open_ensemble, raw_bytes, torch_dtype
from ._io_format import _read_chunk as read_chunk
from ._io_state import PathLike, template_module, unique_tensors
from ._io_write import atomic_write
from ._state import _replace_state
from .ensemble import Ensemble

if TYPE_CHECKING:
    from .distributed import ShardedEnsemble

__all__ = ["INDEX", "load_block", "read_rows", "rebuild", "save_one_file", "save_per_rank"]

INDEX = "index.json"
_INDEX_FORMAT = "vensemble.shards/1"


def rebuild(
    template: nn.Module, tensors: dict[str, Tensor], requires_grad: dict[str, bool] | None = None
) -> nn.Module:
    """A copy of ``template`` whose tensors are ``tensors`` (by canonical name), ties kept."""
    ids = {id(t): k for k, t in unique_tensors(template).items()}

    def make_param(p: nn.Parameter) -> nn.Parameter:
        name = ids[id(p)]
        grad = p.requires_grad if requires_grad is None else requires_grad[name]
        return nn.Parameter(tensors[name], requires_grad=grad)

    return _replace_state(template, make_param, lambda b: tensors[ids[id(b)]])


def _error(e: BaseException) -> str:
    return str(e) if isinstance(e, EnsembleError) else f"{type(e).__name__}: {e}"


# ----------------------------------------------------------------------------- saving


def save_one_file(shard: ShardedEnsemble, path: PathLike) -> None:
    """Gather every tensor's blocks to rank 0, which writes one vensemble file atomically."""
    from .io import save

    comm, target = shard._comm, Path(path)
    problem = None
    if comm.main:
        if target.is_dir():
            problem = f"cannot write {target}: it is a folder, expected a file path"
        elif not target.parent.is_dir():
            problem = f"cannot write {target}: the folder {target.parent} does not exist"
    problem = comm.broadcast_object(problem, "save: check the path on rank 0")
    if problem is not None:
        raise EnsembleError(problem)
    template = shard.local._template
    gathered: dict[str, Tensor] = {}
    for name, t in unique_tensors(template).items():
        whole = comm.gather_blocks(t, shard.block_sizes, f"save: gather '{name}'")
        if whole is not None:
            gathered[name] = whole  # (N, ...) on rank 0's CPU
    error = None
    if comm.main:
        try:
            save(Ensemble._from_template(rebuild(template, gathered), len(shard)), target)
        except Exception as e:  # every rank must learn it: no rank may wait for the others
            error = _error(e)
    comm.agree(error, f"save to {target}")


def _read_index(folder: Path) -> dict[str, Any]:
    index = folder / INDEX
    if not index.is_file():
        raise EnsembleError(
            f"{folder} is a folder without {INDEX}: not a per-rank save of a sharded ensemble "
            "(or that save did not finish)"
        )
    try:
        data = json.loads(index.read_text())
        parts = [(str(p["file"]), int(p["start"]), int(p["stop"])) for p in data["parts"]]
        total = int(data["num_members"])
        ok = data.get("format") == _INDEX_FORMAT
    except (ValueError, KeyError, TypeError) as e:
        raise EnsembleError(f"{index} is damaged: {e!r}") from None
    if not ok:
        raise EnsembleError(f"{index} is not a vensemble shard index ({_INDEX_FORMAT})")
    expect = 0
    for file, start, stop in parts:
        if start != expect or stop <= start or Path(file).name != file:
            raise EnsembleError(
                f"{index} is damaged: part {file!r} holds members {start}..{stop - 1}, "
                f"expected a file name holding members from {expect}"
            )
        expect = stop
    if expect != total:
        raise EnsembleError(f"{index} is damaged: its parts hold {expect} of {total} members")
    return {"parts": parts, "num_members": total}


def part_name(start: int, stop: int, token: str) -> str:
    """The file of members ``start..stop-1`` in a per-rank save."""
    return f"members-{start:06d}-{stop - 1:06d}.{token}.safetensors"


def save_per_rank(shard: ShardedEnsemble, path: PathLike, optimizer: Any) -> None:
    """Each rank writes its block as a vensemble file; rank 0 then writes the index.

    Part names carry a fresh token, so a save that fails half-way never mixes with the
    previous one: the index (written last, atomically) lists only complete parts, and the
    previous save's parts are removed after it is replaced.
    """
    from .io import save

    comm, folder = shard._comm, Path(path)
    token = comm.broadcast_object(secrets.token_hex(4) if comm.main else None, "save: name parts")
    part = folder / part_name(shard.start, shard.stop, token)
    error = None
    try:
        if folder.exists() and not folder.is_dir():
            raise EnsembleError(f"cannot write the shards into {folder}: it is a file")
        folder.mkdir(parents=True, exist_ok=True)
        save(shard.local, part, optimizer=optimizer)
    except Exception as e:
        error = _error(e)
    try:
        comm.agree(error, f"save (per rank) into {folder}")
        error = None
        if comm.main:
            try:
                _write_index(folder, shard, token)
            except Exception as e:
                error = _error(e)
        comm.agree(error, f"save: write {folder / INDEX}")
    except BaseException:
        with suppress(OSError):
            part.unlink()
        raise


def _write_index(folder: Path, shard: ShardedEnsemble, token: str) -> None:
    old: list[str] = []
    with suppress(EnsembleError):
        old = [f for f, _, _ in _read_index(folder)["parts"]] if (folder / INDEX).exists() else []
    parts = [
        {"file": part_name(start, start + size, token), "start": start, "stop": start + size}
        for start, size in shard._block_starts()
    ]
    data = {"format": _INDEX_FORMAT, "num_members": len(shard), "parts": parts}
    text = json.dumps(data, indent=1).encode()

    def write(f: BinaryIO) -> None:
        f.write(text)

    atomic_write(folder / INDEX, write)
    keep = {p["file"] for p in parts}
    for name in old:
        if name not in keep:
            with suppress(OSError):
                (folder / name).unlink()


# ----------------------------------------------------------------------------- loading


def read_rows(info: FileInfo, name: str, lo: int, hi: int) -> Tensor:
    """Members ``lo..hi-1`` of tensor ``name``: only the checksum chunks that hold them are
    read, each checked against its CRC-32. Shape ``(hi - lo, ...)``."""
    chunk = CHUNK_BYTES
    begin, end = info.spans[name]
    per = (end - begin) // info.num_members  # bytes of one member's slice
    shape = [hi - lo, *info.shapes[name][1:]]
    dtype = torch_dtype(info.dtypes[name])
    if per == 0 or hi == lo:
        return torch.empty(shape, dtype=dtype)
    a, b = lo * per, hi * per  # the wanted bytes, relative to the tensor's start
    first, last = a // chunk, -(-b // chunk)  # the checksum chunks that hold them
    base = first * chunk
    buf = torch.empty(min(end - begin, last * chunk) - base, dtype=torch.uint8)
    view = raw_bytes(buf)
    for k in range(first, last):
        s = k * chunk - base
        piece = view[s : s + chunk]
        if read_chunk(info, name, piece, begin + k * chunk) != info.checksums[name][k]:
            raise damaged(info.path, f"tensor '{name}' does not match its checksum")
    rows = buf[a - base : b - base].view(dtype).reshape(shape)
    return rows.clone() if rows.numel() * rows.element_size() < buf.numel() else rows


def _block_of(info: FileInfo, template: nn.Module, lo: int, hi: int) -> dict[str, Tensor]:
    from .io import _check_fits

    names = _check_fits(info, template, member=True)
    return {name: read_rows(info, name, lo, hi) for name in names}


def load_block(
    path: PathLike, factory_or_module: Any, comm: Comm, n: int | None
) -> tuple[nn.Module, int]:
    """This rank's block of a file or per-rank folder: its stacked template, and ``N``."""
    if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 1):
        raise EnsembleError(f"n must be a positive int or None, got {n!r}")
    p = Path(path)
    template = template_module(factory_or_module)
    if p.is_dir():
        index = _read_index(p)
        parts = [(p / f, a, b) for f, a, b in index["parts"]]
        total = index["num_members"]
    else:
        with open_ensemble(p) as info:
            total = info.num_members
        parts = [(p, 0, total)]
    if n is not None and n != total:
        raise EnsembleError(f"{p} holds {total} members, but n={n} members were asked for")
    if total < comm.world:
        raise EnsembleError(f"{p} holds {total} members, too few to split over {comm.world} ranks")
    start, stop = block_bounds(total, comm.world, comm.rank)
    pieces: dict[str, list[Tensor]] = {}
    grads: dict[str, bool] = {}
    for file, a, b in parts:
        lo, hi = max(a, start), min(b, stop)
        if lo >= hi:
            continue
        with open_ensemble(file) as info:
            if info.num_members != b - a:
                raise damaged(file, f"it holds {info.num_members} members, its index says {b - a}")
            for name, rows in _block_of(info, template, lo - a, hi - a).items():
                pieces.setdefault(name, []).append(rows)
            grads = {k: bool(v["requires_grad"]) for k, v in info.fingerprint["parameters"].items()}
    tensors = {k: torch.cat(v) if len(v) > 1 else v[0] for k, v in pieces.items()}
    return rebuild(template, tensors, grads), total

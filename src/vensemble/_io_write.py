"""Writing safetensors files atomically, with checksums computed while the data is written."""

from __future__ import annotations

import json
import os
import secrets
import stat
import struct
import threading
import zlib
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from contextlib import suppress
from pathlib import Path
from typing import Any, BinaryIO

from torch import Tensor

from ._errors import EnsembleError
from ._io_format import CHECKSUMS_KEY, CHUNK_BYTES, DTYPE_CODES, SUB, chunks, pool, raw_bytes

__all__ = ["atomic_write", "write_safetensors"]

_SEEK_LOCK = threading.Lock()


def _file_mode(path: Path) -> int:
    """The permission bits the file would get from a plain ``open(path, "w")``."""
    with suppress(OSError):
        return stat.S_IMODE(path.stat().st_mode)
    umask = 0o022
    with suppress(OSError, ValueError), open("/proc/self/status") as f:
        for line in f:
            if line.startswith("Umask:"):
                umask = int(line.split()[1], 8)
    return 0o666 & ~umask


def _fsync_folder(folder: Path) -> None:
    if os.name != "posix":  # Windows cannot open a folder for fsync; NTFS journals the rename
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Write a file so that ``path`` only ever holds the old file or the complete new one.

    ``write`` fills a temporary file in the same folder; it is flushed and fsynced, renamed
    over ``path`` with ``os.replace`` (atomic on POSIX and Windows), and the folder is fsynced
    so the rename survives a power cut. On any error the temporary file is removed and
    ``path`` is untouched. A killed process can leave a ``.<name>.<random>.tmp`` file behind,
    never a damaged ``path``.
    """
    if path.is_dir():
        raise EnsembleError(f"cannot write {path}: it is a folder, expected a file path")
    # through a symlink, as open(path, "wb") would: replacing the link itself would leave
    # the file it points to with the old contents
    path = Path(os.path.realpath(path)) if path.is_symlink() else path
    folder = path.parent
    if not folder.is_dir():
        raise EnsembleError(f"cannot write {path}: the folder {folder} does not exist")
    # a short name: the file system's name limit must not fall on the temporary file
    tmp = folder / f".{path.name[:32]}.{secrets.token_hex(6)}.tmp"
    mode = _file_mode(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_folder(folder)


def _pwrite(f: BinaryIO, data: memoryview | bytes, at: int) -> None:
    """Write all of ``data`` at offset ``at`` (positionless where the OS allows: thread-safe)."""
    view = memoryview(data)
    while len(view):
        if hasattr(os, "pwrite"):
            n = os.pwrite(f.fileno(), view, at)
        else:  # Windows: a lock keeps seek + write together
            with _SEEK_LOCK:
                f.seek(at)
                n = f.write(view)
        view, at = view[n:], at + n


def _write_chunk(f: BinaryIO, data: memoryview, at: int, checksum: bool) -> int:
    """Write ``data`` at ``at`` in cache-sized pieces, each checksummed just before; its CRC-32."""
    crc = 0
    for s in range(0, len(data), SUB):
        part = data[s : s + SUB]
        crc = zlib.crc32(part, crc) if checksum else 0
        _pwrite(f, part, at + s)
    return crc


def write_safetensors(
    path: Path,
    tensors: Mapping[str, Tensor],
    metadata: Mapping[str, str],
    *,
    checksums: bool = False,
) -> None:
    """Write contiguous CPU ``tensors`` and string ``metadata`` as one safetensors file, atomically.

    Tensors are laid out by element size, largest first (as safetensors does), so each starts
    at an offset aligned to its element size. Chunks are written by parallel threads, each
    piece checksummed (CRC-32) while in cache just before it is written; with ``checksums``
    the CRCs go under ``vensemble.checksums``. The header goes in last, its size fixed in
    advance by the fixed-width checksums.
    """
    order = sorted(tensors, key=lambda k: -tensors[k].element_size())  # stable: keeps name order
    entries: dict[str, Any] = {}
    offset = 0
    for name in order:
        t = tensors[name]
        if t.dtype not in DTYPE_CODES:
            raise EnsembleError(
                f"tensor '{name}' has dtype {t.dtype}, which safetensors cannot store"
            )
        nbytes = t.numel() * t.element_size()
        entries[name] = {
            "dtype": DTYPE_CODES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes

    def header(sums: dict[str, list[str]] | None) -> bytes:
        meta = dict(metadata)
        if sums is not None:
            table = {"algorithm": "crc32", "chunk_bytes": CHUNK_BYTES, "tensors": sums}
            meta[CHECKSUMS_KEY] = json.dumps(table, separators=(",", ":"))
        raw = json.dumps({"__metadata__": meta, **entries}, separators=(",", ":")).encode()
        return raw + b" " * (-len(raw) % 8)  # safetensors pads the header to 8 bytes

    sizes = {k: t.numel() * t.element_size() for k, t in tensors.items()}
    placeholder = header(
        {k: ["0" * 8 for _ in chunks(b)] for k, b in sizes.items()} if checksums else None
    )

    def write(f: BinaryIO) -> None:
        start = 8 + len(placeholder)
        f.truncate(start + offset)
        jobs: dict[str, list[Future[int]]] = {}
        with pool() as workers:  # each chunk is checksummed and written by one thread
            for name in order:
                data, at = raw_bytes(tensors[name]), start + entries[name]["data_offsets"][0]
                jobs[name] = [
                    workers.submit(_write_chunk, f, data[s : s + CHUNK_BYTES], at + s, checksums)
                    for s in chunks(len(data))
                ]
            sums = {k: [f"{job.result():08x}" for job in js] for k, js in jobs.items()}
        final = header(sums if checksums else None)
        if len(final) != len(placeholder):
            raise RuntimeError("vensemble: the safetensors header changed size while writing")
        _pwrite(f, struct.pack("<Q", len(final)) + final, 0)

    atomic_write(path, write)

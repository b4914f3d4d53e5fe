"""The vensemble file format (safetensors with metadata and checksums) and how it is read.

A vensemble file is an ordinary safetensors file. Its tensors are the ensemble's distinct
parameters and buffers under the member's canonical ``state_dict`` names, each with a leading
member dim ``N``, plus optional optimizer tensors under ``optimizer/``. Its ``__metadata__``
(strings only) holds ``format`` (``"pt"``, the safetensors convention) and:

* ``vensemble.format_version`` (``"1"``), ``vensemble.version``, ``vensemble.num_members``;
* ``vensemble.dtypes``: JSON list of the tensors' dtypes, parameters first;
* ``vensemble.fingerprint``: JSON of :func:`vensemble.fingerprint` of one member, and
  ``vensemble.fingerprint_digest``;
* ``vensemble.aliases``: JSON ``{tied name: stored name}`` (a tied weight is stored once);
* ``vensemble.checksums``: JSON ``{"algorithm": "crc32", "chunk_bytes": C, "tensors":
  {name: ["8 hex digits" per C-byte chunk of its bytes]}}``;
* ``vensemble.optimizer`` (optional): JSON of an optimizer ``state_dict``, each tensor
  replaced by ``{"tensor": key}``, and ``vensemble.optimizer_crc32``: the CRC-32 of that JSON
  text's UTF-8 bytes, 8 hex digits (files written before it existed are read without it).
"""

from __future__ import annotations

import json
import math
import os
import struct
import zlib
from collections.abc import Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor

from ._errors import EnsembleError
from ._state import fingerprint_digest

__all__ = [
    "CHECKSUMS_KEY",
    "CHUNK_BYTES",
    "DTYPE_CODES",
    "FORMAT_VERSION",
    "OPTIMIZER_PREFIX",
    "SUB",
    "FileInfo",
    "checked_file",
    "chunks",
    "damaged",
    "dtype_code",
    "open_ensemble",
    "open_safetensors",
    "pool",
    "raw_bytes",
    "read_tensors",
    "torch_dtype",
]

FORMAT_VERSION = 1
CHECKSUMS_KEY = "vensemble.checksums"
CHUNK_BYTES = 64 << 20  # checksum granularity; chunks are read and verified in parallel
OPTIMIZER_PREFIX = "optimizer/"
SUB = 1 << 20  # bytes per read/write call: the checksum runs while they are in cache

# fmt: off
DTYPE_CODES: dict[torch.dtype, str] = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint64: "U64", torch.uint32: "U32", torch.uint16: "U16", torch.uint8: "U8",
    torch.bool: "BOOL", torch.complex64: "C64",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}
# fmt: on
_CODE_DTYPES = {code: dtype for dtype, code in DTYPE_CODES.items()}


def torch_dtype(code: str) -> torch.dtype:
    """The torch dtype of a safetensors dtype code (codes in a parsed file are known)."""
    return _CODE_DTYPES[code]


def dtype_code(dtype: str) -> str | None:
    """The safetensors code of a dtype written as ``str(torch.float32)``, or None."""
    return next((c for d, c in DTYPE_CODES.items() if str(d) == dtype), None)


def raw_bytes(t: Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, without a copy (little-endian hosts)."""
    flat = t.reshape(-1).view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8)
    return flat.numpy().data


def chunks(nbytes: int) -> range:
    """Start offsets of the checksum chunks of ``nbytes`` bytes (an empty tensor has one)."""
    return range(0, nbytes, CHUNK_BYTES) if nbytes else range(1)


def pool() -> ThreadPoolExecutor:
    """Threads for reads and checksums (both release the GIL on large buffers)."""
    return ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1))


# ----------------------------------------------------------------------------- reading


def checked_file(path: str | os.PathLike[str], what: str = "ensemble file") -> Path:
    """``path`` as a ``Path`` that names an existing file (not a folder), or an ``EnsembleError``."""
    p = Path(path)
    if not p.exists():
        raise EnsembleError(f"{what} {p} does not exist")
    if p.is_dir():
        raise EnsembleError(f"{what} {p} is a folder, expected a file")
    return p


@contextmanager
def open_safetensors(path: Path) -> Iterator[Any]:
    """``safe_open`` on the CPU; any failure to open becomes an ``EnsembleError`` naming the file.

    Safetensors holds no code: nothing in the file is ever executed.
    """
    try:
        handle = safe_open(str(path), framework="pt", device="cpu")
    except Exception as e:
        raise EnsembleError(f"{path} is not a readable safetensors file: {e}") from None
    with handle as f:
        yield f


@dataclass(frozen=True)
class FileInfo:
    """What a vensemble file's header says, checked for consistency (no tensor data read)."""

    path: Path
    fd: int  # open for the duration of ``open_ensemble``: reads see one version of the file
    size: int
    metadata: dict[str, str]
    num_members: int
    fingerprint: dict[str, Any]
    digest: str
    aliases: dict[str, str]
    checksums: dict[str, list[int]]
    shapes: dict[str, list[int]]  # every tensor in the file
    dtypes: dict[str, str]  # safetensors dtype codes ("F32", ...)
    spans: dict[str, tuple[int, int]]  # absolute [begin, end) byte offsets in the file

    @property
    def version(self) -> str:
        return self.metadata.get("vensemble.version", "?")

    @property
    def has_optimizer(self) -> bool:
        return "vensemble.optimizer" in self.metadata


def text_crc32(text: str) -> str:
    """The CRC-32 of ``text``'s UTF-8 bytes as 8 hex digits (for metadata strings)."""
    return f"{zlib.crc32(text.encode()):08x}"


def damaged(path: Path, what: str) -> EnsembleError:
    return EnsembleError(f"{path} is damaged or not a vensemble ensemble file: {what}")


def _json(path: Path, meta: Mapping[str, str], key: str, kind: type) -> Any:
    if key not in meta:
        raise damaged(path, f"its metadata has no '{key}'")
    try:
        value = json.loads(meta[key])
    except ValueError as e:
        raise damaged(path, f"metadata '{key}' is not valid JSON ({e})") from None
    if not isinstance(value, kind):
        raise damaged(
            path, f"metadata '{key}' is a {type(value).__name__}, expected a {kind.__name__}"
        )
    return value


def _check_fingerprint(path: Path, fp: dict[str, Any]) -> None:
    """The fingerprint has the structure :func:`vensemble.fingerprint` produces."""
    for key in ("modules", "parameters", "buffers", "ties"):
        if not isinstance(fp.get(key), dict):
            raise damaged(path, f"the fingerprint has no '{key}' table")
    if "" not in fp["modules"]:
        raise damaged(path, "the fingerprint has no root module")
    for path_, mod in fp["modules"].items():
        if not isinstance(mod, dict) or not all(
            isinstance(mod.get(k), t)
            for k, t in (("class", str), ("extra_repr", str), ("attributes", dict))
        ):
            raise damaged(path, f"the fingerprint's module '{path_}' is malformed")
    for kind in ("parameters", "buffers"):
        for name, entry in fp[kind].items():
            shape = entry.get("shape") if isinstance(entry, dict) else None
            flag = "requires_grad" if kind == "parameters" else "persistent"
            if not (
                isinstance(shape, list)
                and all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape)
                and isinstance(entry.get("dtype"), str)
                and isinstance(entry.get(flag), bool)
            ):
                raise damaged(path, f"the fingerprint's entry for '{name}' is malformed")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in fp["ties"].items()):
        raise damaged(path, "the fingerprint's ties are malformed")


def _pread(fd: int, size: int, offset: int) -> bytes:
    out = b""
    while len(out) < size:
        if hasattr(os, "pread"):
            part = os.pread(fd, size - len(out), offset + len(out))
        else:  # Windows; only one thread reads the header
            os.lseek(fd, offset + len(out), os.SEEK_SET)
            part = os.read(fd, size - len(out))
        if not part:
            break
        out += part
    return out


def _header(path: Path, fd: int, size: int) -> tuple[dict[str, Any], int]:
    """The raw header (already validated by safetensors) and where the tensor bytes start."""
    (length,) = struct.unpack("<Q", _pread(fd, 8, 0))
    try:
        header = json.loads(_pread(fd, length, 8))
    except ValueError as e:
        raise damaged(path, f"the header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise damaged(path, "the header is not a JSON object")
    return header, 8 + length


def _parse(path: Path, fd: int) -> FileInfo:
    with open_safetensors(path) as handle:  # safetensors validates the header first
        try:
            meta = dict(handle.metadata() or {})
            keys = list(handle.keys())
        except Exception as e:
            raise EnsembleError(f"{path}: could not read the safetensors header: {e}") from None
    if "vensemble.format_version" not in meta:
        raise EnsembleError(
            f"{path} is a safetensors file but not a vensemble ensemble file (no "
            "'vensemble.format_version' in its metadata); for one model's checkpoints per "
            "member use Ensemble.from_checkpoints"
        )
    version = meta["vensemble.format_version"]
    if not version.isdigit() or int(version) < 1:
        raise damaged(path, f"format version {version!r} is not a positive integer")
    if int(version) > FORMAT_VERSION:
        raise EnsembleError(
            f"{path} uses vensemble file format {version}, written by vensemble "
            f"{meta.get('vensemble.version', '?')}; this vensemble reads format {FORMAT_VERSION}: "
            "upgrade vensemble"
        )
    n_text = meta.get("vensemble.num_members", "")
    if not n_text.isdigit() or int(n_text) < 1:
        raise damaged(
            path, f"metadata 'vensemble.num_members' is {n_text!r}, expected a positive integer"
        )
    fp = _json(path, meta, "vensemble.fingerprint", dict)
    _check_fingerprint(path, fp)
    digest = meta.get("vensemble.fingerprint_digest", "")
    if digest != fingerprint_digest(fp):
        raise damaged(path, "the architecture fingerprint does not match its digest")
    aliases = _json(path, meta, "vensemble.aliases", dict)
    if aliases != fp["ties"]:
        raise damaged(path, "the tied-weight aliases do not match the fingerprint")
    size = os.fstat(fd).st_size
    header, start = _header(path, fd, size)
    shapes: dict[str, list[int]] = {}
    dtypes: dict[str, str] = {}
    spans: dict[str, tuple[int, int]] = {}
    for name in keys:
        entry: Any = header.get(name)
        try:
            shape, code, (begin, end) = list(entry["shape"]), entry["dtype"], entry["data_offsets"]
            fits = end - begin == math.prod(shape) * _CODE_DTYPES[code].itemsize
            fits = fits and isinstance(begin, int) and begin >= 0 and start + end <= size
        except (TypeError, KeyError, ValueError) as e:
            raise damaged(path, f"the header entry of '{name}' is malformed ({e!r})") from None
        if not fits:
            raise damaged(path, f"the byte range of '{name}' does not fit its shape or the file")
        shapes[name], dtypes[name], spans[name] = shape, code, (start + begin, start + end)
    sums = _json(path, meta, CHECKSUMS_KEY, dict)
    if sums.get("algorithm") != "crc32" or sums.get("chunk_bytes") != CHUNK_BYTES:
        raise damaged(
            path, f"unknown checksum scheme {sums.get('algorithm')!r}/{sums.get('chunk_bytes')!r}"
        )
    table = sums.get("tensors")
    if not isinstance(table, dict) or set(table) != set(keys):
        raise damaged(path, "the checksum table does not list exactly the file's tensors")
    checksums: dict[str, list[int]] = {}
    for name, crcs in table.items():
        lo, hi = spans[name]
        if not (
            isinstance(crcs, list)
            and len(crcs) == len(chunks(hi - lo))
            and all(isinstance(c, str) and len(c) == 8 for c in crcs)
        ):
            raise damaged(path, f"the checksums of '{name}' are malformed")
        try:
            checksums[name] = [int(c, 16) for c in crcs]
        except ValueError:
            raise damaged(path, f"the checksums of '{name}' are not hexadecimal") from None
    return FileInfo(
        path=path,
        fd=fd,
        size=size,
        metadata=meta,
        num_members=int(n_text),
        fingerprint=fp,
        digest=digest,
        aliases=aliases,
        checksums=checksums,
        shapes=shapes,
        dtypes=dtypes,
        spans=spans,
    )


@contextmanager
def open_ensemble(path: str | os.PathLike[str]) -> Iterator[FileInfo]:
    """Open a vensemble file and check its header; tensors are read with :func:`read_tensors`.

    Raises:
        EnsembleError: a missing file, a folder, not a safetensors file, not a vensemble
            file, a newer format, or a header that is damaged or inconsistent.
    """
    p = checked_file(path)
    try:
        fd = os.open(p, os.O_RDONLY | getattr(os, "O_BINARY", 0))
    except OSError as e:
        raise EnsembleError(f"ensemble file {p} cannot be opened: {e.strerror}") from None
    try:
        yield _parse(p, fd)
    finally:
        os.close(fd)


def _read_chunk(info: FileInfo, name: str, out: memoryview, offset: int) -> int:
    """Fill ``out`` from the file at ``offset``; return the CRC-32 of what was read."""
    with ExitStack() as stack:
        if hasattr(os, "preadv"):  # one shared descriptor, no file position: thread-safe

            def read(part: memoryview, at: int) -> int:
                return os.preadv(info.fd, [part], at)

        else:  # Windows: a handle per chunk (a file open there cannot be replaced)
            f = stack.enter_context(open(info.path, "rb", buffering=0))

            def read(part: memoryview, at: int) -> int:
                f.seek(at)
                return f.readinto(part) or 0

        crc = pos = 0
        while pos < len(out):
            part = out[pos : pos + SUB]
            got = read(part, offset + pos)
            if got == 0:
                raise damaged(info.path, f"the file ends inside tensor '{name}'")
            crc = zlib.crc32(part[:got], crc)
            pos += got
    return crc


def read_tensors(info: FileInfo, names: list[str]) -> dict[str, Tensor]:
    """Read ``names`` into fresh CPU memory, checking every chunk against its CRC-32.

    Chunks are read in parallel threads straight into the tensors' memory and checksummed
    while in cache; nothing is returned unless every chunk matches, so a damaged file never
    reaches a model. Peak memory: the tensors themselves.
    """
    out = {n: torch.empty(info.shapes[n], dtype=_CODE_DTYPES[info.dtypes[n]]) for n in names}
    jobs: list[tuple[str, int, Future[int]]] = []
    with pool() as workers:
        for name, t in out.items():
            data, begin = raw_bytes(t), info.spans[name][0]
            for k, s in enumerate(chunks(len(data))):
                view = data[s : s + CHUNK_BYTES]
                jobs.append((name, k, workers.submit(_read_chunk, info, name, view, begin + s)))
        for name, k, job in jobs:
            if job.result() != info.checksums[name][k]:
                raise damaged(info.path, f"tensor '{name}' does not match its checksum")
    return out

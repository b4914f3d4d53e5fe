"""``vensemble inspect FILE``: what an ensemble file holds, read from its header alone."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

from ._errors import EnsembleError
from ._io_format import OPTIMIZER_PREFIX, open_ensemble, torch_dtype

__all__ = ["register", "summarize"]

_LONG = 100  # metadata values longer than this are abbreviated in the text report


def summarize(path: str | Path) -> dict[str, Any]:
    """A JSON-ready summary of a file written by ``vensemble.io.save`` (no tensor data is read).

    Returns:
        A dict with ``file``, ``size_bytes``, ``members``, ``dtypes``,
        ``parameters_per_member``, ``parameters_total``, ``buffer_elements_per_member``,
        ``tied`` (alias -> stored name), ``architecture`` (one ``{path, class, config}`` per
        module, root first), ``fingerprint_digest``, ``optimizer`` (``None`` or its tensor
        count and bytes) and ``metadata`` (the raw string metadata).

    Raises:
        EnsembleError: the file is missing, a folder, not a vensemble file or damaged.

    Example:
        >>> import os, tempfile, torch
        >>> from vensemble import Ensemble
        >>> from vensemble.io import save
        >>> tmp = tempfile.TemporaryDirectory()
        >>> path = os.path.join(tmp.name, "ens.safetensors")
        >>> save(Ensemble.from_factory(lambda: torch.nn.Linear(4, 2), 3), path)
        >>> s = summarize(path)
        >>> s["members"], s["parameters_per_member"], s["parameters_total"]
        (3, 10, 30)
        >>> tmp.cleanup()
    """
    with open_ensemble(path) as info:
        p = info.path
    fp = info.fingerprint
    ties = fp["ties"]

    def elements(kind: str) -> int:
        return sum(math.prod(e["shape"]) for k, e in fp[kind].items() if k not in ties)

    opt = [hi - lo for k, (lo, hi) in info.spans.items() if k.startswith(OPTIMIZER_PREFIX)]
    per_member = elements("parameters")
    model_codes = [c for k, c in info.dtypes.items() if not k.startswith(OPTIMIZER_PREFIX)]
    return {
        "file": str(p),
        "size_bytes": info.size,
        "format_version": int(info.metadata["vensemble.format_version"]),
        "vensemble_version": info.version,
        "members": info.num_members,
        "dtypes": list(dict.fromkeys(str(torch_dtype(c)) for c in model_codes)),
        "parameters_per_member": per_member,
        "parameters_total": per_member * info.num_members,
        "buffer_elements_per_member": elements("buffers"),
        "tied": dict(ties),
        "architecture": [
            {"path": path_, "class": m["class"], "config": m["extra_repr"]}
            for path_, m in fp["modules"].items()
        ],
        "fingerprint_digest": info.digest,
        "optimizer": {"tensors": len(opt), "bytes": sum(opt)} if info.has_optimizer else None,
        "metadata": dict(sorted(info.metadata.items())),
    }


def _size(nbytes: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if nbytes < 1000 or unit == "GB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1000  # type: ignore[assignment]
    raise AssertionError  # unreachable


def format_summary(s: dict[str, Any]) -> str:
    """The text report ``vensemble inspect`` prints."""
    arch = s["architecture"]
    root = arch[0]["class"].rsplit(".", 1)[-1]
    opt = s["optimizer"]
    lines = [
        f"{s['file']}: {_size(s['size_bytes'])} ({s['size_bytes']:,} bytes), vensemble file "
        f"format {s['format_version']}, written by vensemble {s['vensemble_version']}",
        f"members:     {s['members']}",
        f"dtypes:      {', '.join(s['dtypes'])}",
        f"parameters:  {s['parameters_per_member']:,} per member, {s['parameters_total']:,} in all",
        f"buffers:     {s['buffer_elements_per_member']:,} elements per member",
        "tied:        "
        + (", ".join(f"{a} -> {b}" for a, b in s["tied"].items()) if s["tied"] else "none"),
        "optimizer:   "
        + (f"saved ({opt['tensors']} tensors, {_size(opt['bytes'])})" if opt else "none"),
        f"architecture ({root}, fingerprint {s['fingerprint_digest']}):",
    ]
    for m in arch:
        depth = m["path"].count(".") + 1 if m["path"] else 0
        name = f"{m['path'].rsplit('.', 1)[-1]}: " if m["path"] else ""
        cls = m["class"].rsplit(".", 1)[-1]
        lines.append("  " + "  " * depth + f"{name}{cls}({m['config']})")
    lines.append("metadata:")
    for key, value in s["metadata"].items():
        shown = value if len(value) <= _LONG else f"{value[:60]}... ({len(value):,} characters)"
        lines.append(f"  {key}: {shown}")
    return "\n".join(lines)


def _run(args: argparse.Namespace) -> int:
    try:
        summary = summarize(args.file)
    except EnsembleError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(summary, indent=2) if args.json else format_summary(summary))
    return 0


def register(subparsers: Any) -> None:
    """Add the ``inspect`` verb to the ``vensemble`` command line."""
    parser = subparsers.add_parser(
        "inspect",
        help="show what an ensemble file holds: members, dtypes, parameters, size, architecture",
    )
    parser.add_argument("file", help="a file written by vensemble.io.save")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(run=_run)

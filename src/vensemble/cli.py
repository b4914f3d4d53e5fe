"""The `vensemble` command line: `vensemble demo` (and the verbs registered below)."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

import torch

from ._errors import EnsembleError

__all__ = ["main"]

# Modules that add a verb: each defines `register(subparsers)`, which adds its parser and sets
# `run=<function(args) -> int>` as a default. Add one line here for a new verb.
_VERB_MODULES: tuple[str, ...] = ("_bench", "_inspect", "_train_cli")


def positive_int(text: str) -> int:
    """An argparse type: an int of at least 1 (argparse then names the flag in its error)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive int, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive int, got {value}")
    return value


def device_name(text: str) -> str:
    """An argparse type: a device torch knows and this machine has (``cpu``, ``cuda:1``, ...).

    A typo or an absent accelerator is a one-line usage error naming the flag, not a traceback
    from the first tensor moved there.
    """
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(
            f"not a device: {text!r} (expected cpu, cuda, cuda:1, mps, ...)"
        ) from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise argparse.ArgumentTypeError(f"{text!r}: this machine has no CUDA device")
        if device.index is not None and device.index >= count:
            raise argparse.ArgumentTypeError(
                f"{text!r}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}"
            )
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise argparse.ArgumentTypeError(f"{text!r}: MPS is not available on this machine")
    return text


def _demo(args: argparse.Namespace) -> int:
    from ._demo import format_demo, run_demo

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    rows = run_demo(args.members, args.batch, device, args.seed, rounds=args.rounds)
    print(format_demo(rows, args.members, args.batch, device))
    worst = max(r.max_abs_diff for r in rows)
    if worst > 1e-4:
        print(f"error: the ensemble differs from the loop by {worst:.2e}", file=sys.stderr)
        return 1
    print("both options match the loop")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vensemble", description="Run and train many PyTorch models as one."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo", help="the Model ensembling tutorial, checked against the loop and timed"
    )
    demo.add_argument(
        "--members", type=positive_int, default=10, help="number of models (default 10)"
    )
    demo.add_argument("--batch", type=positive_int, default=64, help="minibatch size (default 64)")
    demo.add_argument(
        "--device",
        type=device_name,
        default=None,
        help="cpu, cuda, cuda:1, ... (default: cuda if present)",
    )
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument(
        "--rounds", type=positive_int, default=7, help="interleaved timing rounds (default 7)"
    )
    demo.set_defaults(run=_demo)
    for name in _VERB_MODULES:
        importlib.import_module(f"vensemble.{name}").register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `vensemble` console script and `python -m vensemble`."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args))
    except EnsembleError as err:  # a user's mistake: one line, not a traceback
        print(f"vensemble {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())

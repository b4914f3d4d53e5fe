"""`vensemble train`: a deep ensemble on the digits data (or your tensors), trained and evaluated."""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import metrics
from ._errors import EnsembleError
from .cli import device_name, positive_int
from .ensemble import Ensemble
from .io import save
from .train import History, MemberOptimizer, fit

__all__ = ["register", "run_train"]


@dataclass
class Dataset:
    """Features ``x`` ``(n, ...)`` (float32) and class labels ``y`` ``(n,)``; ``image`` shape."""

    name: str
    x: Tensor
    y: Tensor
    image: tuple[int, int] | None


def load_data(source: str) -> Dataset:
    """scikit-learn's bundled digits (``"digits"``), or ``X``/``y`` from a ``.pt`` or ``.npz``."""
    if source == "digits":
        try:
            from sklearn.datasets import load_digits
        except ImportError:
            raise EnsembleError(
                "the digits data comes with scikit-learn: pip install 'vensemble[data]'"
            ) from None
        digits = load_digits()
        x = torch.tensor(digits.data, dtype=torch.float32)  # (1797, 64), pixel values 0..16
        return Dataset("digits", x, torch.tensor(digits.target), (8, 8))
    path = Path(source)
    if not path.exists():
        raise EnsembleError(f"--data: no file {source!r} (give 'digits', a .pt or a .npz file)")
    if path.suffix == ".npz":
        import numpy as np

        with np.load(path) as f:
            if "X" not in f or "y" not in f:
                raise EnsembleError(f"--data: {source} must hold arrays 'X' and 'y'")
            x, y = torch.from_numpy(f["X"]), torch.from_numpy(f["y"])
    elif path.suffix == ".pt":
        blob = torch.load(path, weights_only=True)
        if isinstance(blob, dict) and "X" in blob and "y" in blob:
            x, y = blob["X"], blob["y"]
        elif isinstance(blob, (tuple, list)) and len(blob) == 2:
            x, y = blob
        else:
            raise EnsembleError(f"--data: {source} must hold a dict with 'X' and 'y' or (X, y)")
    else:
        raise EnsembleError(f"--data: {source} is neither a .pt nor a .npz file")
    if y.ndim != 1 or x.shape[0] != y.shape[0] or y.is_floating_point():
        raise EnsembleError(
            f"--data: X {tuple(x.shape)} and y {tuple(y.shape)} must have the same number of "
            "samples, with y holding integer class labels"
        )
    image = (x.shape[1], x.shape[2]) if x.ndim == 3 else None
    return Dataset(path.stem, x.float(), y.long(), image)


def split(n: int, seed: int, val: float = 0.15, test: float = 0.25) -> tuple[Tensor, ...]:
    """Seeded train / validation / test indices."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_test, n_val = int(n * test), int(n * val)
    return order[n_test + n_val :], order[n_test : n_test + n_val], order[:n_test]


def make_mlp(d_in: int, hidden: int, classes: int) -> nn.Module:
    return nn.Sequential(
        nn.Linear(d_in, hidden),
        nn.ReLU(),
        nn.Linear(hidden, hidden),
        nn.ReLU(),
        nn.Linear(hidden, classes),
    )


def ood_sets(data: Dataset, x_test: Tensor, seed: int) -> dict[str, Tensor]:
    """Out-of-distribution inputs made from the data (raw feature space).

    ``rotated``: the test images turned by 90 degrees (image data only); ``uniform noise``:
    each feature drawn uniformly between its smallest and largest value in the data.
    """
    g = torch.Generator().manual_seed(seed + 1)
    sets: dict[str, Tensor] = {}
    if data.image is not None:
        h, w = data.image
        images = x_test.reshape(-1, h, w)
        sets["rotated digits" if data.name == "digits" else "rotated"] = torch.rot90(
            images, 1, dims=(1, 2)
        ).reshape(x_test.shape)
    flat = data.x.reshape(data.x.shape[0], -1)
    low, high = flat.min(dim=0).values, flat.max(dim=0).values
    noise = low + (high - low) * torch.rand(x_test.shape[0], flat.shape[1], generator=g)
    sets["uniform noise"] = noise.reshape(x_test.shape)
    return sets


def _scores(probs: Tensor, y: Tensor) -> tuple[float, float, float]:
    return (
        float(metrics.accuracy(probs, y)),
        float(metrics.nll(probs, y)),
        float(metrics.expected_calibration_error(probs, y)),
    )


def _learning_curves(history: History, path: Path) -> bool:
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return False
    fig = Figure(figsize=(9, 3.8), layout="constrained")
    ax_train, ax_val = fig.subplots(1, 2, sharey=True)
    epochs = range(1, history.epochs + 1)
    for i in range(history.num_members):
        ax_train.plot(epochs, history.train_loss[:, i].tolist(), lw=1, label=f"member {i}")
        if history.val_loss is not None:
            ax_val.plot(epochs, history.val_loss[:, i].tolist(), lw=1)
    if history.best_epoch is not None and history.best_val_loss is not None:
        ax_val.scatter(
            (history.best_epoch + 1).tolist(),
            history.best_val_loss.tolist(),
            s=12,
            c="black",
            zorder=3,
            label="best epoch",
        )
        ax_val.legend(loc="upper right", fontsize="small")
    ax_train.set(title="training loss", xlabel="epoch", ylabel="cross-entropy", yscale="log")
    ax_val.set(title="validation loss", xlabel="epoch")
    if history.num_members <= 10:
        ax_train.legend(loc="upper right", fontsize="x-small", ncols=2)
    fig.savefig(path, dpi=110)
    return True


def _build(args: argparse.Namespace, factory: Callable[[], nn.Module]) -> Any:
    """The ensemble: a ShardedEnsemble under torchrun (``WORLD_SIZE`` set), else an Ensemble."""
    if "WORLD_SIZE" in os.environ:  # torchrun: each rank trains its block of members
        from .distributed import ShardedEnsemble

        return ShardedEnsemble(factory, args.members, seed=args.seed, device=args.device)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return Ensemble.from_factory(factory, args.members, seed=args.seed).to(device)


def run_train(args: argparse.Namespace) -> int:
    """Train, evaluate and save; prints the report. Returns the exit status.

    Under ``torchrun`` every rank trains its block of the members; rank 0 prints the report
    and writes the plots, and the ensemble file holds all members.
    """
    start = time.time()
    data = load_data(args.data)
    train_idx, val_idx, test_idx = split(len(data.y), args.seed)
    mean = data.x[train_idx].mean(dim=0)
    std = data.x[train_idx].std(dim=0).clamp_min(1e-3)

    def prep(x: Tensor) -> Tensor:
        z = (x - mean) / std  # standardised with the training statistics
        return z.reshape(z.shape[0], -1).to(device)  # (n, features)

    classes = int(data.y.max()) + 1
    d_in = math.prod(data.x.shape[1:])
    model = _build(args, lambda: make_mlp(d_in, args.hidden, classes))
    ens: Ensemble = getattr(model, "local", model)  # this process's members
    device = next(iter(ens.state_dict().values())).device
    main = getattr(model, "rank", 0) == 0
    say = print if main else (lambda *a, **k: None)
    x_test, y_test = data.x[test_idx], data.y[test_idx].to(device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    optimizer = MemberOptimizer(torch.optim.AdamW, ens, lr=args.lr, weight_decay=args.weight_decay)
    history = fit(
        model,
        (prep(data.x[train_idx]), data.y[train_idx].to(device)),
        F.cross_entropy,
        optimizer=optimizer,
        epochs=args.epochs,
        batch_size=args.batch_size,
        data_mode=args.data_mode,
        seed=args.seed,
        val_data=(prep(data.x[val_idx]), data.y[val_idx].to(device)),
        early_stopping_patience=args.patience,
        progress=not args.quiet,
    )
    model.eval()
    with torch.no_grad():
        logits = model(prep(x_test)).float().cpu()  # (N, B, C): all members, on every rank
        ood = {
            name: model(prep(x)).float().cpu()
            for name, x in ood_sets(data, x_test, args.seed).items()
        }
    y_cpu = y_test.cpu()
    train_s = time.time() - start

    arch = "-".join(str(v) for v in (d_in, args.hidden, args.hidden, classes))
    say(
        f"vensemble train: {args.members} x MLP {arch} on {data.name} ({len(train_idx)} train / "
        f"{len(val_idx)} val / {len(test_idx)} test), {history.epochs} epochs, "
        f"{args.data_mode} data, {device}{_ranks(model)}, {train_s:.1f} s"
    )
    rows = [_scores(logits[i].softmax(dim=-1), y_cpu) for i in range(args.members)]
    say(f"\n{'':<12}{'accuracy':>10}{'NLL':>9}{'ECE':>9}{'best epoch':>12}")
    best_epoch = history.best_epoch.tolist() if history.best_epoch is not None else []
    for i, (acc, nll, ece) in enumerate(rows):
        say(f"{f'member {i}':<12}{acc:>10.4f}{nll:>9.4f}{ece:>9.4f}{best_epoch[i]:>12}")
    probs = metrics.mean_probs(logits)
    ensemble = _scores(probs, y_cpu)
    best = min(range(args.members), key=lambda i: rows[i][1])
    mean_row = tuple(sum(r[k] for r in rows) / len(rows) for k in range(3))
    say(f"\nEvaluation on the {len(test_idx)} test samples")
    say(f"{'':<28}{'accuracy':>10}{'NLL':>9}{'ECE':>9}")
    for name, (acc, nll, ece) in (
        ("ensemble", ensemble),
        (f"best member (member {best})", rows[best]),
        ("mean member", mean_row),
    ):
        say(f"{name:<28}{acc:>10.4f}{nll:>9.4f}{ece:>9.4f}")
    say("\nOut-of-distribution detection, AUROC against the test samples")
    say(f"{'':<28}{'mutual information':>20}{'predictive entropy':>20}")
    mi_in, pe_in = metrics.mutual_information(logits), metrics.predictive_entropy(logits)
    for name, out_logits in ood.items():
        mi = float(metrics.ood_auroc(mi_in, metrics.mutual_information(out_logits)))
        pe = float(metrics.ood_auroc(pe_in, metrics.predictive_entropy(out_logits)))
        say(f"{name:<28}{mi:>20.4f}{pe:>20.4f}")

    save(model, out / "ensemble.safetensors")  # under torchrun: gathered, rank 0 writes
    saved = [out / "ensemble.safetensors"]
    if not main:
        return _leave_together()
    if _learning_curves(history, out / "learning_curves.png"):
        from .plots import reliability_diagram

        reliability_diagram(probs, y_cpu).savefig(out / "reliability.png", dpi=110)
        saved += [out / "learning_curves.png", out / "reliability.png"]
    else:
        print("(matplotlib is not installed: no plots written)", file=sys.stderr)
    print(f"\nsaved: {', '.join(str(p) for p in saved)}")
    return _leave_together()


def _leave_together() -> int:
    """Under torchrun: every rank waits for rank 0's plots, then the group is taken down.

    A rank that left early and tore its process group down while rank 0 was still connected
    sometimes aborted in the backend's threads ("terminate called without an active
    exception"), failing the whole torchrun job after the work was done.
    """
    import torch.distributed as dist

    from ._dist_comm import destroy_default_group

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        destroy_default_group()
    return 0


def _ranks(model: Any) -> str:
    world = getattr(model, "world_size", 1)
    return f" x {world} processes" if world > 1 else ""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``train`` verb."""
    p = subparsers.add_parser(
        "train",
        help="train and evaluate a deep ensemble (digits data, or X/y from a .pt/.npz file)",
        description="Train a deep ensemble of MLPs in one vectorized loop, then report each "
        "member's and the ensemble's test accuracy, NLL and calibration, and how well the "
        "ensemble's uncertainty flags out-of-distribution inputs.",
    )
    p.add_argument("--data", default="digits", help="'digits' (default) or a .pt/.npz with X, y")
    p.add_argument("--members", type=positive_int, default=8, help="ensemble size (default 8)")
    p.add_argument("--epochs", type=positive_int, default=40, help="epochs (default 40)")
    p.add_argument(
        "--batch-size", type=positive_int, default=64, help="samples per member per step"
    )
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (default 1e-3)")
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--hidden", type=positive_int, default=128, help="hidden width (default 128)")
    p.add_argument(
        "--data-mode",
        default="shuffle",
        choices=("shared", "shuffle", "bootstrap"),
        help="the same batches for all, a shuffle per member (default) or bagging",
    )
    p.add_argument(
        "--patience",
        type=positive_int,
        default=8,
        help="per-member early-stopping patience (default 8)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--out", default="vensemble-train", help="output folder (default ./vensemble-train)"
    )
    p.add_argument(
        "--device", type=device_name, default=None, help="cpu, cuda, ... (default: cuda if present)"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=run_train)

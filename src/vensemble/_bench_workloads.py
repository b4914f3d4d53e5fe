"""The benchmark's workloads: which models, how many members, which inputs (forward, float32)."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ._demo import TutorialMLP

__all__ = [
    "WORKLOAD_KEYS",
    "Workload",
    "cnn",
    "main_workloads",
    "mlp",
    "sweep_workloads",
]

# The keys `--workload` accepts; "sweep" and "memory" are handled by their own runners.
WORKLOAD_KEYS = ("tutorial1", "tutorial2", "small100", "tiny1000", "cnn8", "sweep", "memory")


def mlp(widths: tuple[int, ...]) -> nn.Sequential:
    """``Linear``/``ReLU`` layers with the given widths, e.g. ``(16, 64, 64, 1)``.

    Example:
        >>> mlp((16, 64, 64, 1))(torch.randn(5, 16)).shape
        torch.Size([5, 1])
    """
    layers: list[nn.Module] = []
    for k, (a, b) in enumerate(itertools.pairwise(widths)):
        if k:
            layers.append(nn.ReLU())
        layers.append(nn.Linear(a, b))
    return nn.Sequential(*layers)


def cnn(channels: tuple[int, int] = (16, 32), classes: int = 10) -> nn.Sequential:
    """conv3x3, BN, ReLU, conv3x3, BN, ReLU, global average pool, linear (3 input channels).

    Example:
        >>> cnn()(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """
    c1, c2 = channels
    return nn.Sequential(
        nn.Conv2d(3, c1, 3, padding=1),
        nn.BatchNorm2d(c1),
        nn.ReLU(),
        nn.Conv2d(c1, c2, 3, padding=1),
        nn.BatchNorm2d(c2),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(c2, classes),
    )


@dataclass(frozen=True)
class Workload:
    """One benchmark case: ``n`` members of ``factory()`` on one call's inputs.

    Attributes:
        key: short name (``--workload``); sweep points share the key ``"sweep"``.
        title: what a reader sees in the table.
        factory: builds one member (member ``i`` under ``torch.manual_seed(seed + i)``).
        n: number of members.
        batch: samples per member per call.
        sample_shape: shape of one sample, e.g. ``(1, 28, 28)``.
        per_member: ``True``: member ``i`` sees ``xs[i]`` (``in_dims=0``); ``False``: one
            batch for all.
        widths: the MLP's layer widths (hand-batched and JAX candidates need them), or
            ``None`` for models that are not plain MLPs.
        flops: multiply-add FLOPs (x2) of one call over all members (matmuls, convolutions).
        classifier: outputs are class logits (torchensemble's ``VotingClassifier`` applies).
        eval_mode: members run in ``eval()`` mode (BatchNorm uses its running stats).
    """

    key: str
    title: str
    factory: Callable[[], nn.Module]
    n: int
    batch: int
    sample_shape: tuple[int, ...]
    per_member: bool
    widths: tuple[int, ...] | None
    flops: float
    classifier: bool = False
    eval_mode: bool = False

    def members(self, seed: int = 0) -> list[nn.Module]:
        """The ``n`` standalone members, member ``i`` built under ``manual_seed(seed + i)``."""
        out = []
        with torch.random.fork_rng(devices=[]):
            for i in range(self.n):
                torch.manual_seed(seed + i)
                m = self.factory()
                out.append(m.eval() if self.eval_mode else m)
        return out

    def make_input(self, seed: int = 0) -> Tensor:
        """``(n, batch, *sample_shape)`` when per member, else ``(batch, *sample_shape)``."""
        lead = (self.n, self.batch) if self.per_member else (self.batch,)
        gen = torch.Generator().manual_seed(seed)
        return torch.randn(*lead, *self.sample_shape, generator=gen)


def _mlp_flops(widths: tuple[int, ...], n: int, batch: int) -> float:
    return 2.0 * n * batch * sum(a * b for a, b in itertools.pairwise(widths))


def _mlp_workload(
    key: str, n: int, batch: int, widths: tuple[int, ...], per_member: bool = False
) -> Workload:
    dims = "-".join(map(str, widths))
    feed = "a batch per member" if per_member else "one batch for all"
    return Workload(
        key=key,
        title=f"{n} x MLP {dims}, batch {batch}, {feed}",
        factory=lambda: mlp(widths),
        n=n,
        batch=batch,
        sample_shape=(widths[0],),
        per_member=per_member,
        widths=widths,
        flops=_mlp_flops(widths, n, batch),
    )


def _tutorial(key: str, n: int, batch: int, per_member: bool) -> Workload:
    widths = (784, 128, 128, 10)
    option = "option 1, a minibatch per member" if per_member else "option 2, one minibatch"
    return Workload(
        key=key,
        title=f"tutorial: {n} x MLP 784-128-128-10, batch {batch}, {option}",
        factory=TutorialMLP,
        n=n,
        batch=batch,
        sample_shape=(1, 28, 28),
        per_member=per_member,
        widths=widths,
        flops=_mlp_flops(widths, n, batch),
        classifier=True,
    )


def _cnn_workload(n: int, batch: int, side: int) -> Workload:
    c1, c2, classes = 16, 32, 10
    per_sample = 2.0 * side * side * 9 * (3 * c1 + c1 * c2) + 2.0 * c2 * classes
    return Workload(
        key="cnn8",
        title=f"{n} x CNN (conv3x3 {c1}, BN, conv3x3 {c2}, BN, pool, linear), batch {batch}, "
        f"{side}x{side}, eval",
        factory=lambda: cnn((c1, c2), classes),
        n=n,
        batch=batch,
        sample_shape=(3, side, side),
        per_member=False,
        widths=None,
        flops=per_sample * n * batch,
        classifier=True,
        eval_mode=True,
    )


def main_workloads(quick: bool = False) -> dict[str, Workload]:
    """The issue's four rows (both tutorial options): ``key -> Workload``.

    ``quick`` keeps the architectures but shrinks members, batches and images (for tests).

    Example:
        >>> [w.n for w in main_workloads(quick=True).values()]
        [3, 3, 4, 8, 2]
    """
    if quick:
        return {
            "tutorial1": _tutorial("tutorial1", 3, 8, per_member=True),
            "tutorial2": _tutorial("tutorial2", 3, 8, per_member=False),
            "small100": _mlp_workload("small100", 4, 8, (16, 64, 64, 1)),
            "tiny1000": _mlp_workload("tiny1000", 8, 8, (8, 32, 32, 1)),
            "cnn8": _cnn_workload(2, 4, 8),
        }
    return {
        "tutorial1": _tutorial("tutorial1", 10, 64, per_member=True),
        "tutorial2": _tutorial("tutorial2", 10, 64, per_member=False),
        "small100": _mlp_workload("small100", 100, 32, (16, 64, 64, 1)),
        "tiny1000": _mlp_workload("tiny1000", 1000, 128, (8, 32, 32, 1)),
        "cnn8": _cnn_workload(8, 32, 32),
    }


def sweep_workloads(quick: bool = False, base: int = 4, largest: int = 1024) -> list[Workload]:
    """The N sweep of the small MLP 16-64-64-1 (batch 32, one batch for all): N = 1, base, ...

    Example:
        >>> [w.n for w in sweep_workloads(quick=True)]
        [1, 4, 16]
    """
    top = 16 if quick else largest
    ns = [1]
    while ns[-1] * base <= top:
        ns.append(ns[-1] * base)
    return [_mlp_workload("sweep", n, 32, (16, 64, 64, 1)) for n in ns]

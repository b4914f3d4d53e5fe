"""`vensemble demo`: the PyTorch "Model ensembling" tutorial end to end, checked and timed."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call, stack_module_state, vmap

from ._timing import interleaved_medians
from .ensemble import Ensemble

__all__ = ["DemoRow", "TutorialMLP", "format_demo", "run_demo"]


class TutorialMLP(nn.Module):
    """The tutorial's model: 784-128-128-10 with ReLU, flattening its input."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(784, 128)
        self.fc2 = nn.Linear(128, 128)
        self.fc3 = nn.Linear(128, 10)

    def forward(self, x: Tensor) -> Tensor:
        x = x.flatten(1)  # (B, 784)
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


@dataclass
class DemoRow:
    option: str
    loop_s: float
    torch_func_s: float
    vensemble_s: float
    max_abs_diff: float

    @property
    def speedup(self) -> float:
        return self.loop_s / self.vensemble_s


def run_demo(
    members: int = 10, batch: int = 64, device: str | None = None, seed: int = 0, rounds: int = 7
) -> list[DemoRow]:
    """Run the tutorial's two options with the loop, torch.func and vensemble; time all three.

    Option 1 gives each model its own minibatch ``(N, B, 1, 28, 28)``; option 2 gives all models
    one minibatch ``(B, 1, 28, 28)``. Outputs are ``(N, B, 10)``; each is checked against the loop.
    """
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    ens = Ensemble.from_factory(TutorialMLP, members, seed=seed).to(dev)
    models = [m.to(dev) for m in ens.unstack()]
    params, buffers = stack_module_state(models)
    base = copy.deepcopy(models[0]).to("meta")

    def fmodel(p: dict[str, Tensor], b: dict[str, Tensor], x: Tensor) -> Tensor:
        return functional_call(base, (p, b), (x,))

    gen = torch.Generator().manual_seed(seed)
    minibatches = torch.randn(members, batch, 1, 28, 28, generator=gen).to(dev)
    minibatch = minibatches[0]
    rows = []
    with torch.no_grad():
        cases = {
            "1: a minibatch per model": (
                lambda: torch.stack([m(x) for m, x in zip(models, minibatches)]),
                lambda: vmap(fmodel)(params, buffers, minibatches),
                lambda: ens(minibatches, in_dims=0),
            ),
            "2: one minibatch for all": (
                lambda: torch.stack([m(minibatch) for m in models]),
                lambda: vmap(fmodel, in_dims=(0, 0, None))(params, buffers, minibatch),
                lambda: ens(minibatch),
            ),
        }
        for option, (loop, tfunc, ours) in cases.items():
            expected = loop()
            diff = max(
                (tfunc() - expected).abs().max().item(), (ours() - expected).abs().max().item()
            )
            times = interleaved_medians(
                {"loop": loop, "torch.func": tfunc, "vensemble": ours}, rounds=rounds
            )
            rows.append(
                DemoRow(option, times["loop"], times["torch.func"], times["vensemble"], diff)
            )
    return rows


def format_demo(rows: list[DemoRow], members: int, batch: int, device: str) -> str:
    """The demo's table, one row per option."""
    head = f"{members} x MLP 784-128-128-10, batch {batch}, {device}, {torch.get_num_threads()} threads"
    lines = [
        head,
        f"{'option':<26} {'loop ms':>9} {'torch.func ms':>14} {'vensemble ms':>13} {'speedup':>8} {'max |diff|':>11}",
    ]
    for r in rows:
        lines.append(
            f"{r.option:<26} {r.loop_s * 1e3:>9.3f} {r.torch_func_s * 1e3:>14.3f} "
            f"{r.vensemble_s * 1e3:>13.3f} {r.speedup:>7.2f}x {r.max_abs_diff:>11.2e}"
        )
    lines.append(
        "speedup = loop time / vensemble time (medians of interleaved rounds, torch.utils.benchmark)"
    )
    return "\n".join(lines)

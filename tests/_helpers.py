"""Shared test helpers: a zoo of member architectures and the loop oracle."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["ZOO", "Tied", "assert_tree_close", "fake_measurement", "member_loop", "zoo_input"]


class MLP(nn.Module):
    def __init__(self, d_in: int = 6, hidden: int = 16, d_out: int = 3) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.out = nn.Linear(hidden, d_out)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


class CNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 6, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(6)
        self.head = nn.Linear(6, 5)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        x = x.mean(dim=(-1, -2))
        return self.head(x)


class Tied(nn.Module):
    """An embedding tied to the output layer, as in language models."""

    def __init__(self, vocab: int = 11, dim: int = 8) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.mix = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, vocab, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, tokens: Tensor) -> Tensor:
        return self.out(torch.tanh(self.mix(self.emb(tokens))))


class Recurrent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 6)
        self.rnn = nn.LSTM(6, 5, batch_first=True)
        self.head = nn.Linear(5, 2)

    def forward(self, x: Tensor) -> Tensor:
        h, _ = self.rnn(torch.tanh(self.proj(x)))
        return self.head(h[:, -1])


def _ln_gelu() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 12), nn.LayerNorm(12), nn.GELU(), nn.Linear(12, 3))


def _dropout() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Dropout(0.3), nn.Linear(12, 3))


def _transformer() -> nn.Module:
    return nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=True)


def _embedding() -> nn.Module:
    return nn.Sequential(nn.Embedding(11, 6), nn.Flatten(-2), nn.Linear(6 * 4, 3))


# name -> (factory, input maker for batch size B)
ZOO: dict[str, tuple[Callable[[], nn.Module], Callable[[int], Tensor]]] = {
    "mlp": (MLP, lambda b: torch.randn(b, 6)),
    "cnn_bn": (CNN, lambda b: torch.randn(b, 3, 6, 6)),
    "dropout": (_dropout, lambda b: torch.randn(b, 6)),
    "ln_gelu": (_ln_gelu, lambda b: torch.randn(b, 6)),
    "transformer": (_transformer, lambda b: torch.randn(b, 4, 8)),
    "embedding": (_embedding, lambda b: torch.randint(0, 11, (b, 4))),
    "tied": (Tied, lambda b: torch.randint(0, 11, (b, 4))),
    "lstm": (Recurrent, lambda b: torch.randn(b, 5, 4)),
}


def zoo_input(name: str, batch: int, dtype: torch.dtype) -> Tensor:
    x = ZOO[name][1](batch)
    return x.to(dtype) if x.is_floating_point() else x


def member_loop(members: list[nn.Module], xs: list[Any]) -> Tensor:
    """The oracle: each standalone member on its own input, stacked."""
    return torch.stack([m(x) for m, x in zip(members, xs)])


def assert_tree_close(actual: Any, expected: Any, atol: float, rtol: float = 1e-5) -> None:
    if isinstance(expected, Tensor):
        torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)
    elif isinstance(expected, (tuple, list)):
        assert type(actual) is type(expected) and len(actual) == len(expected)
        for a, e in zip(actual, expected):
            assert_tree_close(a, e, atol, rtol)
    elif isinstance(expected, dict):
        assert actual.keys() == expected.keys()
        for k in expected:
            assert_tree_close(actual[k], expected[k], atol, rtol)
    else:
        assert actual == expected


def fake_measurement(
    monkeypatch: Any, times: dict[str, float], probe: str, refused: type[Exception]
) -> list[list[str]]:
    """auto's measurement replaced: each path offered takes ``times[path]`` seconds (1.0 when
    not listed); ``probe`` first runs once, as the real warm-up would, and is left out where
    it raises ``refused``. Returns the paths each measurement was offered."""
    from vensemble import ensemble as ensemble_module

    offered: list[list[str]] = []

    def timings(paths: dict[str, Any], restore: Callable[[], None], **kwargs: Any) -> Any:
        offered.append(list(paths))
        if probe in paths:
            try:
                paths[probe]()
            except refused:
                paths = {k: v for k, v in paths.items() if k != probe}
            finally:
                restore()
        return {k: times.get(k, 1.0) for k in paths}

    monkeypatch.setattr(ensemble_module, "measure_paths", timings)
    return offered

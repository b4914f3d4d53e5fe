"""Peer libraries as benchmark candidates: tensordict, torchensemble and JAX, when they import."""

from __future__ import annotations

import copy
import importlib.util
import os
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ._bench_candidates import Candidate, first_line, stacked_linears
from ._bench_workloads import Workload

__all__ = ["PEERS", "peer_candidates"]

PEERS = ("tensordict", "torchensemble", "jax")
_INSTALL = "pip install 'vensemble[bench]'"


def _missing(name: str, module: str) -> Candidate | None:
    if importlib.util.find_spec(module) is None:
        return Candidate(name, "peer", None, note=f"not installed ({_INSTALL})")
    return None


def _tensordict(w: Workload, models: list[nn.Module], x: Tensor) -> Candidate:
    """``TensorDict.from_modules(*models, as_module=True)`` + ``torch.vmap`` over ``to_module``."""
    name = "tensordict"
    missing = _missing(name, "tensordict")
    if missing is not None:
        return missing
    from tensordict import TensorDict

    params = TensorDict.from_modules(*models, as_module=True)
    base = copy.deepcopy(models[0]).to("meta")

    def call(p: Any, inp: Tensor) -> Tensor:
        with p.to_module(base):
            return base(inp)

    batched = torch.vmap(call, (0, 0 if w.per_member else None))
    return Candidate(name, "peer", lambda: batched(params, x), note="from_modules + vmap")


def _torchensemble(w: Workload, models: list[nn.Module], x: Tensor) -> Candidate:
    """torchensemble's ``VotingClassifier`` forward with its estimators set to the members."""
    name = "torchensemble"
    if not w.classifier or w.per_member:
        return Candidate(name, "peer", None, note="n/a: VotingClassifier needs one input, logits")
    missing = _missing(name, "torchensemble")
    if missing is not None:
        return missing
    from torchensemble import VotingClassifier

    voting = VotingClassifier(estimator=models[0], n_estimators=len(models), cuda=False)
    voting.estimators_ = nn.ModuleList(models)
    voting.train(not w.eval_mode)

    def expect(loop_out: Tensor) -> Tensor:
        return torch.softmax(loop_out, dim=-1).mean(0)  # (B, C): soft vote

    return Candidate(
        name,
        "peer",
        lambda: voting(x),
        expect=expect,
        note="VotingClassifier: a loop + softmax + mean (soft vote)",
    )


def _jax(w: Workload, models: list[nn.Module], x: Tensor, device: torch.device) -> Candidate:
    """``jax.jit(jax.vmap(mlp))`` over the same stacked weights, full float32 matmuls."""
    name = "jax jit(vmap)"
    if w.widths is None:
        return Candidate(name, "peer", None, note="n/a: only the MLPs are written in JAX")
    missing = _missing(name, "jax")
    if missing is not None:
        return missing
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # leave the GPU to torch
    import jax
    import jax.numpy as jnp

    jax.config.update("jax_default_matmul_precision", "highest")  # no TF32: torch uses none
    if device.type == "cpu":
        target = jax.devices("cpu")[0]
    elif jax.default_backend() == "gpu":
        target = jax.devices()[0]
    else:
        return Candidate(name, "peer", None, note="n/a: this jaxlib has no GPU backend")

    def put(t: Tensor) -> Any:
        return jax.device_put(jnp.asarray(t.detach().cpu().numpy()), target)

    layers = [(put(wt), put(b[:, 0])) for wt, b in stacked_linears(models)]  # (N,in,out), (N,out)

    def mlp(params: list[tuple[Any, Any]], h: Any) -> Any:
        for k, (wt, b) in enumerate(params):
            h = h @ wt + b
            if k < len(params) - 1:
                h = jax.nn.relu(h)
        return h

    xin = put(x.reshape(*x.shape[: 2 if w.per_member else 1], w.widths[0]))
    fn = jax.jit(jax.vmap(mlp, in_axes=(0, 0 if w.per_member else None)))

    def to_torch(out: Any) -> Tensor:
        return torch.from_numpy(jax.device_get(out).copy())

    return Candidate(
        name,
        "peer",
        lambda: fn(layers, xin).block_until_ready(),
        compiled=True,
        to_torch=to_torch,
        note=f"XLA {target.platform}, its own thread pool",
    )


def peer_candidates(
    w: Workload, models: list[nn.Module], x: Tensor, device: torch.device
) -> list[Candidate]:
    """The peers' candidates for ``w``; a peer that is missing or does not apply is skipped."""
    out = []
    builders: list[Callable[[], Candidate]] = [
        lambda: _tensordict(w, models, x),
        lambda: _torchensemble(w, models, x),
        lambda: _jax(w, models, x, device),
    ]
    for peer, build in zip(PEERS, builders):
        try:
            out.append(build())
        except Exception as err:  # a peer's own failure must not stop the benchmark
            out.append(Candidate(peer, "peer", None, note=f"failed to build: {first_line(err)}"))
    return out

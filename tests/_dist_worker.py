"""One rank of the distributed tests: `python tests/_dist_worker.py SCENARIO OUTDIR`.

Started by tests/test_distributed.py with torchrun's environment variables (RANK,
WORLD_SIZE, MASTER_ADDR, MASTER_PORT, LOCAL_RANK). Each scenario runs many checks in one
process group and saves what it saw to OUTDIR/<scenario>.rank<r>.pt; the test compares
that with single-process references.
"""

from __future__ import annotations

import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import vensemble as ve
from vensemble.distributed import CollectiveError, ShardedEnsemble

LRS = [1e-2, 2e-2, 5e-3, 1e-2, 3e-2, 1e-2, 2e-2]  # per-member learning rates (first N used)


def net() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))


def dropout_net() -> nn.Module:
    """Every member has the same weights: only dropout masks make members differ."""
    m = nn.Sequential(nn.Linear(6, 32), nn.Dropout(0.5), nn.Linear(32, 3))
    for p in m.parameters():
        nn.init.constant_(p, 0.1)
    return m


def data(seed: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Training and validation data: (x, y, x_val, y_val)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(40, 6, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    xv = torch.randn(24, 6, generator=g)
    yv = (xv[:, 0] > 0).long() + (xv[:, 1] > 0.5).long()
    return x, y, xv, yv


def inputs(n: int) -> tuple[Tensor, Tensor]:
    """A shared input (8, 6) and a per-member input (n, 8, 6)."""
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 6, generator=g), torch.randn(n, 8, 6, generator=g)


def train(model: Any, mode: str, n: int) -> ve.History:
    """The training run compared between world sizes (``model``: Ensemble or shard)."""
    x, y, xv, yv = data()
    lrs = LRS[:n]

    def optimizer(ens: ve.Ensemble) -> torch.optim.Optimizer:
        lr = model.local_part(lrs) if isinstance(model, ShardedEnsemble) else lrs
        # MemberOptimizer (torch 2.13, vensemble 0.1.0) ignores a per-member list whose values
        # are all equal (it trains with the optimizer's default lr): pass one value then
        lr = lr[0] if len(set(lr)) == 1 else lr
        return ve.MemberOptimizer(torch.optim.Adam, ens, lr=lr)

    return ve.fit(
        model,
        (x, y),
        F.cross_entropy,
        optimizer=optimizer,
        epochs=3,
        batch_size=16,
        data_mode=mode,
        seed=3,
        val_data=(xv, yv),
        keep_best_k=2,
        max_grad_norm=1.0,
        progress=False,
    )


def history_record(h: ve.History) -> dict[str, Any]:
    out = h.to_dict()
    assert h.ensemble is not None
    out["kept_state"] = h.ensemble.state_dict()
    return out


def outputs(shard: ShardedEnsemble, n: int) -> dict[str, Tensor]:
    x, xs = inputs(n)
    shard.eval()
    with torch.no_grad():
        got = {
            "shared": shard(x),
            "per_member": shard(xs, in_dims=0),
            "local": shard(x, gather=False),
            "per_member_tuple": shard(xs, in_dims=(0,)),
        }
    return got


def grads(shard: ShardedEnsemble, n: int) -> dict[str, Any]:
    """Backward through the gathered output trains the local block only."""
    x, _ = inputs(n)
    shard.train()
    out = shard(x)  # (N, 8, 3); the local rows carry gradients
    loss = out.pow(2).mean(dim=(1, 2)).sum()
    loss.backward()
    return {
        "out": out.detach(),
        "requires_grad": out.requires_grad,
        "grads": {k: p.grad.clone() for k, p in shard.local.named_parameters()},
        "buffers": {k: b.clone() for k, b in shard.local.named_buffers()},
    }


def dropout(world: int) -> dict[str, Any]:
    """Dropout masks differ between ranks' blocks and repeat under a seed."""
    shard = ShardedEnsemble(dropout_net, 2 * world, seed=0, backend="loop")
    shard.train()
    x, _ = inputs(2 * world)
    torch.manual_seed(5)
    first = shard(x)
    torch.manual_seed(5)
    again = shard(x)
    return {"first": first.detach(), "again": again.detach()}


def write(out: Path, scenario: str, rank: int, result: dict[str, Any]) -> None:
    torch.save(result, out / f"{scenario}.rank{rank}.pt")


def world2(out: Path, rank: int) -> None:
    """World size 2, the process group initialised by ShardedEnsemble from torchrun's
    variables. Ends with rank 1 dying before a save."""
    res: dict[str, Any] = {}
    shard = ShardedEnsemble(net, 5, seed=0, timeout=60)  # 3 + 2 members
    res["bounds"] = (shard.start, shard.stop, shard.block_sizes)
    res["outputs"] = outputs(shard, 5)
    loop = ShardedEnsemble(net, 5, seed=0, backend="loop", timeout=60)
    res["outputs_loop"] = outputs(loop, 5)
    res["grads"] = grads(ShardedEnsemble(net, 5, seed=0, backend="loop", timeout=60), 5)
    for mode in ("shared", "shuffle", "bootstrap"):
        trained = ShardedEnsemble(net, 5, seed=0, backend="loop", timeout=60)
        h = train(trained, mode, 5)
        res[f"fit_{mode}"] = {"state": trained.local.state_dict(), **history_record(h)}
        if mode == "shuffle":
            trained.save(out / "ens2.safetensors")
            trained.save(out / "parts2", per_rank=True)
            trained.save(out / "parts2", per_rank=True)  # again: replaces the first save
            res["gathered"] = trained.to_ensemble([4, 0, 3]).state_dict()
    res["dropout"] = dropout(2)
    x, y, _, _ = data()
    try:  # every rank must train on the same data: the ranks find out together
        ve.fit(shard, (x + rank, y), F.cross_entropy, epochs=1, progress=False)
        res["mismatch"] = None
    except ve.EnsembleError as e:
        res["mismatch"] = str(e)
    write(out, "world2", rank, res)
    # a rank dies: the other's save must fail within the timeout, naming it, and write nothing
    if rank == 1:
        os._exit(0)
    time.sleep(0.5)
    began = time.monotonic()
    try:
        shard.save(out / "killed.safetensors")
        res["kill"] = {"error": None}
    except CollectiveError as e:
        res["kill"] = {"error": str(e), "ranks": e.ranks, "seconds": time.monotonic() - began}
    res["kill"]["exists"] = (out / "killed.safetensors").exists()
    res["kill"]["leftovers"] = sorted(p.name for p in out.iterdir() if "killed" in p.name)
    write(out, "world2", rank, res)
    os._exit(0)  # the group is broken: skip its teardown


def world3(out: Path, rank: int) -> None:
    """World size 3 inside a process group the script initialised itself. Ends with rank 2
    hanging while the others save."""
    import datetime

    import torch.distributed as dist

    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    res: dict[str, Any] = {}
    for n in (5, 7):  # 2 + 2 + 1 and 3 + 2 + 2 members
        shard = ShardedEnsemble(net, n, seed=0)
        res[f"bounds{n}"] = (shard.start, shard.stop)
        res[f"outputs{n}"] = outputs(shard, n)
        res[f"outputs_loop{n}"] = outputs(ShardedEnsemble(net, n, seed=0, backend="loop"), n)
    trained = ShardedEnsemble(net, 5, seed=0, backend="loop")
    h = train(trained, "shuffle", 5)
    res["fit_shuffle"] = {"state": trained.local.state_dict(), **history_record(h)}
    res["loaded_file"] = ShardedEnsemble.load(out / "ens2.safetensors", net).local.state_dict()
    parts = ShardedEnsemble.load(out / "parts2", net, n=5)
    res["loaded_parts"] = parts.local.state_dict()
    res["dropout"] = dropout(3)
    write(out, "world3", rank, res)
    # a rank hangs: the others' save must fail after the (short) timeout, naming it
    short = ShardedEnsemble(net, 3, seed=0, timeout=3)
    if rank == 2:
        time.sleep(60)  # the test kills this process
        os._exit(1)
    began = time.monotonic()
    try:
        short.save(out / "hung.safetensors")
        res["hang"] = {"error": None}
    except CollectiveError as e:
        res["hang"] = {"error": str(e), "ranks": e.ranks, "seconds": time.monotonic() - began}
    res["hang"]["exists"] = (out / "hung.safetensors").exists()
    write(out, "world3", rank, res)
    os._exit(0)


if __name__ == "__main__":
    torch.set_num_threads(1)
    scenario, folder = sys.argv[1], Path(sys.argv[2])
    try:
        {"world2": world2, "world3": world3}[scenario](folder, int(os.environ["RANK"]))
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)

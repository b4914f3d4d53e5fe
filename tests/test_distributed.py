"""ShardedEnsemble on the CPU with gloo: two process groups (world sizes 2 and 3) spawned
by the tests, each running many checks (tests/_dist_worker.py), compared here with the
single-process ensemble; plus world size 1 in this process and `vensemble train` under
torchrun."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import vensemble as ve
from _dist_worker import LRS, dropout_net, inputs, net, train
from vensemble._data import MemberBatches
from vensemble.distributed import ShardedEnsemble, block_sizes

WORKER = Path(__file__).with_name("_dist_worker.py")
ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env(rank: int, world: int, port: int) -> dict[str, str]:
    return dict(
        os.environ,
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        OMP_NUM_THREADS="1",
    )


def _launch(
    scenario: str, world: int, out: Path, timeout: float, hangs: int | None = None
) -> list[dict[str, Any]]:
    """Run one scenario on ``world`` ranks; every wait has a deadline. Rank ``hangs`` is
    expected to hang: it is killed once the others are done."""
    port = _free_port()
    procs, logs = [], []
    for r in range(world):
        log = (out / f"{scenario}.rank{r}.log").open("w")
        cmd = [sys.executable, str(WORKER), scenario, str(out)]
        procs.append(subprocess.Popen(cmd, env=_env(r, world, port), stdout=log, stderr=log))
        logs.append(log)
    deadline = time.monotonic() + timeout
    try:
        for r, p in enumerate(procs):
            if r != hangs:
                p.wait(timeout=max(deadline - time.monotonic(), 1))
    except subprocess.TimeoutExpired:
        pytest.fail(f"{scenario}: a rank did not finish within {timeout} s")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=10)
        for log in logs:
            log.close()
    for r, p in enumerate(procs):
        if r != hangs and p.returncode != 0:
            text = (out / f"{scenario}.rank{r}.log").read_text()[-3000:]
            pytest.fail(f"{scenario}: rank {r} exited with {p.returncode}:\n{text}")
    return [torch.load(out / f"{scenario}.rank{r}.pt", weights_only=False) for r in range(world)]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("dist")


@pytest.fixture(scope="module")
def world2(files: Path) -> list[dict[str, Any]]:
    return _launch("world2", 2, files, timeout=120)


@pytest.fixture(scope="module")
def world3(files: Path, world2: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return _launch("world3", 3, files, timeout=120, hangs=2)  # loads what world2 saved


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """The workers' thread count: BatchNorm's batch statistics (training mode) are reduced in
    another order with two threads, which changes their last bits."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _reference(n: int, backend: str = "loop") -> ve.Ensemble:
    return ve.Ensemble.from_factory(net, n, seed=0, backend=backend).eval()


def _equal_rows(state: dict[str, Tensor], whole: dict[str, Tensor], start: int, stop: int):
    assert state.keys() == whole.keys()
    for k, v in state.items():
        assert torch.equal(v, whole[k][start:stop]), k


@pytest.fixture(scope="module")
def trained() -> dict[str, tuple[ve.Ensemble, ve.History]]:
    """The single-process runs the sharded ones must reproduce, per data mode."""
    out = {}
    with one_thread():
        for mode in ("shared", "shuffle", "bootstrap"):
            ens = ve.Ensemble.from_factory(net, 5, seed=0, backend="loop")
            out[mode] = (ens, train(ens, mode, 5))
    return out


# ----------------------------------------------------------------------------- outputs


def _check_outputs(got: dict[str, Tensor], n: int, start: int, stop: int) -> None:
    x, xs = inputs(n)
    ref = _reference(n)
    with torch.no_grad():
        shared, per_member = ref(x), ref(xs, in_dims=0)
    for key, want in (("shared", shared), ("per_member", per_member)):
        torch.testing.assert_close(got[key], want, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(got["per_member_tuple"], per_member, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(got["local"], shared[start:stop], atol=1e-6, rtol=1e-6)


def test_world1_outputs_equal_the_ensemble_without_a_process_group():
    torch.manual_seed(0)
    shard = ShardedEnsemble(net, 5, seed=0, backend="loop")
    assert (shard.rank, shard.world_size, shard.members, len(shard)) == (0, 1, range(0, 5), 5)
    x, xs = inputs(5)
    ref = _reference(5)
    shard.eval()
    with torch.no_grad():
        assert torch.equal(shard(x), ref(x))
        assert torch.equal(shard(xs, in_dims=0), ref(xs, in_dims=0))
        assert torch.equal(shard(x, gather=False), ref(x))
    _equal_rows(shard.to_ensemble([3, 1]).state_dict(), ref.select([3, 1]).state_dict(), 0, 2)


class _Tempered(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.temperature = 1.0

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(x) / self.temperature


def test_world1_root_settings_are_the_local_blocks():
    # shard.temperature = 0.5 set an attribute no member read
    shard = ShardedEnsemble(_Tempered, 3, seed=0)
    ref = ve.Ensemble.from_factory(_Tempered, 3, seed=0)
    x = torch.randn(5, 4)
    assert shard.temperature == 1.0
    with torch.no_grad():
        shard(x)
        shard.temperature = ref.temperature = 0.5
        torch.testing.assert_close(shard(x), ref(x))
    assert shard.local.temperature == 0.5 and "temperature" not in shard.__dict__
    assert "temperature" in dir(shard)
    del shard.temperature
    assert not hasattr(shard.local, "temperature")
    shard.temperature = 0.25
    assert shard.local.temperature == 0.25 and "temperature" not in shard.__dict__


def test_world1_in_a_process_group_keeps_the_gradient_graph(tmp_path):
    # (torchrun --nproc-per-node 1) the gather sent detached copies and returned them: no
    # graph, and backward() raised
    import torch.distributed as dist

    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1
    )
    try:
        shard = ShardedEnsemble(net, 3, seed=0, backend="loop").train()
        ref = ve.Ensemble.from_factory(net, 3, seed=0, backend="loop").train()
        x, _ = inputs(3)
        with one_thread():
            out = shard(x)
            assert out.requires_grad
            out.pow(2).mean(dim=(1, 2)).sum().backward()
            ref(x).pow(2).mean(dim=(1, 2)).sum().backward()
        for key, p in ref.named_parameters():
            assert torch.equal(shard.local.get_parameter(key).grad, p.grad), key
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("backend", ["auto", "loop"])
def test_world2_outputs_equal_the_single_process_ensemble(world2, backend):
    for rank, res in enumerate(world2):
        start, stop, sizes = res["bounds"]
        assert sizes == [3, 2] and (start, stop) == [(0, 3), (3, 5)][rank]
        got = res["outputs" if backend == "auto" else "outputs_loop"]
        _check_outputs(got, 5, start, stop)
        if backend == "loop":  # the reference's own kernels: equal to the bit
            assert torch.equal(got["shared"], _reference(5)(inputs(5)[0]).detach())


@pytest.mark.parametrize("n", [5, 7])
def test_world3_outputs_equal_the_single_process_ensemble_uneven_blocks(world3, n):
    bounds = {5: [(0, 2), (2, 4), (4, 5)], 7: [(0, 3), (3, 5), (5, 7)]}[n]
    for rank, res in enumerate(world3):
        assert res[f"bounds{n}"] == bounds[rank]
        _check_outputs(res[f"outputs{n}"], n, *bounds[rank])
        _check_outputs(res[f"outputs_loop{n}"], n, *bounds[rank])


def test_gathered_outputs_carry_gradients_to_the_local_members_only(world2):
    x, _ = inputs(5)
    ref = ve.Ensemble.from_factory(net, 5, seed=0, backend="loop").train()
    with one_thread():
        out = ref(x)
        out.pow(2).mean(dim=(1, 2)).sum().backward()
    for res in world2:
        start, stop, _ = res["bounds"]
        g = res["grads"]
        assert g["requires_grad"] and torch.equal(g["out"], out.detach())
        grads = {k: p.grad for k, p in ref.named_parameters()}
        _equal_rows(g["grads"], grads, start, stop)
        _equal_rows(g["buffers"], dict(ref.named_buffers()), start, stop)  # BatchNorm stats


def test_dropout_masks_differ_between_ranks_and_repeat_under_a_seed(world2, world3):
    for results in (world2, world3):
        first = results[0]["dropout"]["first"]  # (2 * world, B, 3): members with equal weights
        for res in results:
            assert torch.equal(res["dropout"]["first"], first)  # every rank gathers the same
            assert torch.equal(res["dropout"]["again"], first)  # the same seed, the same masks
        rows = first.flatten(1)
        for i in range(len(rows)):
            for j in range(i):
                assert not torch.equal(rows[i], rows[j]), (i, j)


# ----------------------------------------------------------------------------- training


@pytest.mark.parametrize("first,count", [(0, 5), (0, 3), (3, 2), (2, 2), (4, 1)])
@pytest.mark.parametrize("mode", ["shuffle", "bootstrap"])
def test_member_batches_of_a_block_are_the_rows_of_the_whole(mode, first, count):
    whole = MemberBatches(mode, 11, 5, 4, torch.Generator().manual_seed(7))
    part = MemberBatches(
        mode, 11, count, 4, torch.Generator().manual_seed(7), first_member=first, total_members=5
    )
    for _ in range(3):  # the generators stay in step epoch after epoch
        for a, b in zip(whole.epoch(), part.epoch(), strict=True):
            assert torch.equal(a[first : first + count], b)
    if mode == "bootstrap":
        assert whole.bootstrap is not None and part.bootstrap is not None
        assert torch.equal(whole.bootstrap[first : first + count], part.bootstrap)
    with pytest.raises(ve.EnsembleError, match="not inside an ensemble of 5"):
        MemberBatches(mode, 11, 3, 4, torch.Generator(), first_member=3, total_members=5)


def _check_training(res: dict[str, Any], ens: ve.Ensemble, h: ve.History, start: int, stop: int):
    _equal_rows(res["state"], ens.state_dict(), start, stop)
    for key in ("train_loss", "val_loss", "val_accuracy", "lr", "best_epoch", "best_val_loss"):
        assert torch.equal(res[key], getattr(h, key)), key
    assert res["stopped_epoch"] == h.stopped_epoch and res["stop_reason"] == h.stop_reason
    assert res["selected"] == h.selected
    assert (res["bootstrap_indices"] is None) == (h.bootstrap_indices is None)
    if h.bootstrap_indices is not None:
        assert torch.equal(res["bootstrap_indices"], h.bootstrap_indices)
    assert h.ensemble is not None
    _equal_rows(res["kept_state"], h.ensemble.state_dict(), 0, 2)  # keep_best_k=2


@pytest.mark.parametrize("mode", ["shared", "shuffle", "bootstrap"])
def test_training_at_world_size_2_gives_the_members_of_world_size_1(world2, trained, mode):
    ens, h = trained[mode]
    assert h.train_loss.shape == (3, 5)
    for res in world2:
        start, stop, _ = res["bounds"]
        _check_training(res[f"fit_{mode}"], ens, h, start, stop)


def test_training_refuses_data_that_differs_between_ranks(world2):
    for res in world2:
        assert "train_data differs between ranks: rank 1's is not rank 0's" in res["mismatch"]


def test_training_at_world_size_3_gives_the_members_of_world_size_1(world3, trained):
    ens, h = trained["shuffle"]
    for res, (start, stop) in zip(world3, [(0, 2), (2, 4), (4, 5)]):
        _check_training(res["fit_shuffle"], ens, h, start, stop)


# ----------------------------------------------------------------------------- files


def test_saved_at_world_size_2_loads_at_1_and_3(world2, world3, trained, files):
    whole = trained["shuffle"][0].state_dict()
    # world size 1: the ordinary loader, and the sharded one (this process, no group)
    _equal_rows(ve.load(files / "ens2.safetensors", net).state_dict(), whole, 0, 5)
    for path in (files / "ens2.safetensors", files / "parts2"):
        shard = ShardedEnsemble.load(path, net, backend="loop")
        assert len(shard) == 5 and shard.local.backend == "loop"
        _equal_rows(shard.local.state_dict(), whole, 0, 5)
    # world size 3: each rank read its own members
    for res, (start, stop) in zip(world3, [(0, 2), (2, 4), (4, 5)]):
        _equal_rows(res["loaded_file"], whole, start, stop)
        _equal_rows(res["loaded_parts"], whole, start, stop)
    # the per-rank folder: one file per rank (each an ordinary ensemble file) and the index;
    # the second save replaced the first one's files
    names = sorted(p.name for p in (files / "parts2").iterdir())
    assert len(names) == 3 and names[0] == "index.json"
    assert names[1].startswith("members-000000-000002.")
    assert names[2].startswith("members-000003-000004.")
    _equal_rows(ve.load(files / "parts2" / names[2], net).state_dict(), whole, 3, 5)
    # gathering chosen members, in the order asked
    for res in world2:
        _equal_rows(res["gathered"], trained["shuffle"][0].select([4, 0, 3]).state_dict(), 0, 3)


def test_load_refuses_what_does_not_fit(files, world2):
    with pytest.raises(ve.EnsembleError, match="holds 5 members, but n=4"):
        ShardedEnsemble.load(files / "ens2.safetensors", net, n=4)
    with pytest.raises(ve.EnsembleError, match="different architecture"):
        ShardedEnsemble.load(files / "parts2", lambda: torch.nn.Linear(6, 3))
    with pytest.raises(ve.EnsembleError, match=r"without index\.json"):
        ShardedEnsemble.load(files, net)


# ----------------------------------------------------------------------------- faults


def test_a_killed_rank_stops_the_others_with_an_error_naming_it(world2):
    kill = world2[0]["kill"]
    assert kill["error"] is not None and kill["ranks"] == [1]
    assert "rank 1 never reached it" in kill["error"] and "of 2" in kill["error"]
    assert kill["seconds"] < 30  # the peer's closed connection is seen at once
    assert not kill["exists"] and kill["leftovers"] == []  # no file, not even a partial one


def test_a_hung_rank_stops_the_others_within_the_timeout(world3):
    for res in world3[:2]:
        hang = res["hang"]
        assert hang["error"] is not None and not hang["exists"]
        assert 2.5 < hang["seconds"] < 20  # the shard's timeout is 3 s
    assert (
        world3[0]["hang"]["ranks"] == [2]
        and "rank 2 never reached it" in (world3[0]["hang"]["error"])
    )


# ----------------------------------------------------------------------------- misc


def test_block_sizes_and_user_errors():
    assert block_sizes(5, 2) == [3, 2] and block_sizes(6, 3) == [2, 2, 2]
    assert block_sizes(7, 3) == [3, 2, 2] and sum(block_sizes(1000, 7)) == 1000
    shard = ShardedEnsemble(dropout_net, 3)
    assert shard.local_part(LRS[:3]) == LRS[:3]
    with pytest.raises(ve.EnsembleError, match="one value per member"):
        shard.local_part([1.0, 2.0])
    with pytest.raises(ve.EnsembleError, match="size 2 at dim 0"):
        shard(torch.randn(2, 4, 6), in_dims=0)
    with pytest.raises(ve.EnsembleError, match="positive int"):
        ShardedEnsemble(net, 0)
    with pytest.raises(ve.EnsembleError, match="out of range"):
        shard.to_ensemble([3])
    with pytest.raises(ve.EnsembleError, match="per_rank=True"):
        shard.save(Path("x.safetensors"), optimizer=object())


def test_bench_distributed_times_one_epoch_in_one_process(capsys):
    from vensemble.cli import main

    assert main(["bench", "--distributed", "--quick", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "8 x MLP 8-16-16-4, one epoch of 64 samples" in out and "1 rank(s)" in out


def test_vensemble_train_under_torchrun_writes_the_file_of_one_process(tmp_path):
    args = ["train", "--members", "3", "--epochs", "2", "--hidden", "16", "--quiet"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT / "src"))
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            "--master_addr=127.0.0.1",
            f"--master_port={_free_port()}",
            "-m",
            "vensemble",
            *args,
            "--out",
            str(tmp_path / "two"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("vensemble train: 3 x MLP") == 1  # rank 0 reports, once
    assert "x 2 processes" in run.stdout and "member 2" in run.stdout
    sharded = ve.load(tmp_path / "two" / "ensemble.safetensors", net_for_digits)
    from vensemble.cli import main

    assert main([*args, "--device", "cpu", "--out", str(tmp_path / "one")]) == 0
    single = ve.load(tmp_path / "one" / "ensemble.safetensors", net_for_digits)
    for k, v in single.state_dict().items():  # auto backends may differ in the last bits
        torch.testing.assert_close(sharded.state_dict()[k], v, atol=1e-5, rtol=1e-5)


def net_for_digits() -> torch.nn.Module:
    from vensemble._train_cli import make_mlp

    return make_mlp(64, 16, 10)

"""Ensemble files: save/load round trips, checkpoints in and out, bad files refused, `inspect`."""

from __future__ import annotations

import json
import os
import pickle
import struct
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch as st_torch
import torch
from safetensors import safe_open
from torch import Tensor, nn

import vensemble as ve
from _helpers import ZOO, Tied, zoo_input
from vensemble.cli import main
from vensemble.io import export, from_checkpoints, load, save


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))


def assert_same_state(actual: nn.Module, expected: nn.Module) -> None:
    a, e = actual.state_dict(), expected.state_dict()
    assert list(a) == list(e)
    for k in e:
        assert a[k].dtype == e[k].dtype and a[k].shape == e[k].shape, k
        assert torch.equal(a[k], e[k]), k


def assert_tree_equal(actual: Any, expected: Any) -> None:
    """Exact equality of nested optimizer state (tensors, tuples, lists, dicts, numbers)."""
    assert type(actual) is type(expected), (actual, expected)
    if isinstance(expected, Tensor):
        assert actual.dtype == expected.dtype and torch.equal(actual, expected)
    elif isinstance(expected, (tuple, list)):
        assert len(actual) == len(expected)
        for a, e in zip(actual, expected):
            assert_tree_equal(a, e)
    elif isinstance(expected, dict):
        assert list(actual) == list(expected)
        for k in expected:
            assert_tree_equal(actual[k], expected[k])
    else:
        assert actual == expected


@pytest.fixture
def saved(tmp_path: Path) -> tuple[ve.Ensemble, Path]:
    ens = ve.Ensemble.from_factory(mlp, 3, seed=0)
    path = tmp_path / "ens.safetensors"
    save(ens, path)
    return ens, path


# ----------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("name", sorted(ZOO))
@pytest.mark.parametrize("n", [1, 3])
def test_save_load_round_trip_equals_the_members(tmp_path, name, n):
    factory = ZOO[name][0]
    ens = ve.Ensemble.from_factory(factory, n, seed=1, backend="loop")
    ens.eval()
    path = tmp_path / "ens.safetensors"
    save(ens, path)
    back = load(path, factory, n=n, backend="loop")
    assert isinstance(back, ve.Ensemble) and len(back) == n
    assert_same_state(back, ens)
    back.eval()
    x = zoo_input(name, 4, torch.float32)
    torch.testing.assert_close(back(x), ens(x), atol=0, rtol=0)  # same state, same computation
    expected = torch.stack([ens.member(i)(x) for i in range(n)])  # the members alone
    # (the ensemble keeps Linear weights in-major, so its GEMMs round like x @ W^T with W^T
    # contiguous, the standalone member's like x @ W.t(): equal up to float32 rounding)
    torch.testing.assert_close(back(x), expected, atol=1e-6, rtol=1e-6)
    for i in range(n):
        assert_same_state(back.member(i), ens.member(i))


def test_tied_weights_are_stored_once_and_stay_tied(tmp_path):
    ens = ve.Ensemble.from_factory(Tied, 3, seed=0)
    path = tmp_path / "tied.safetensors"
    save(ens, path)
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
        meta = f.metadata()
    assert "emb.weight" in keys and "out.weight" not in keys  # one copy on disk
    assert json.loads(meta["vensemble.aliases"]) == {"out.weight": "emb.weight"}
    back = load(path, Tied)
    assert back._template.out.weight is back._template.emb.weight
    assert set(back.state_dict()) == {"emb.weight", "mix.weight", "mix.bias", "out.weight"}
    member = back.member(2)
    assert member.out.weight is member.emb.weight
    assert_same_state(back, ens)


def test_file_is_plain_safetensors_with_the_documented_metadata(saved):
    ens, path = saved
    tensors = st_torch.load_file(path)  # any safetensors reader, no vensemble
    state = ens.state_dict()
    assert set(tensors) == set(state)
    for k, t in tensors.items():
        assert torch.equal(t, state[k]) and t.shape[0] == 3
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert meta["vensemble.format_version"] == "1"
    assert meta["vensemble.version"] == ve.__version__
    assert meta["vensemble.num_members"] == "3"
    assert json.loads(meta["vensemble.dtypes"]) == ["torch.float32"]
    fp = json.loads(meta["vensemble.fingerprint"])
    assert fp == json.loads(json.dumps(ve.fingerprint(ens.member(0))))
    assert meta["vensemble.fingerprint_digest"] == ve._state.fingerprint_digest(fp)
    assert set(json.loads(meta["vensemble.checksums"])["tensors"]) == set(state)


def test_saved_file_gets_ordinary_permissions(saved, tmp_path):
    _, path = saved
    plain = tmp_path / "plain"
    plain.write_bytes(b"")
    assert path.stat().st_mode & 0o777 == plain.stat().st_mode & 0o777
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_dtypes_round_trip_and_a_float32_model_is_refused(tmp_path, dtype):
    ens = ve.Ensemble.from_factory(lambda: mlp().to(dtype), 2)
    path = tmp_path / "ens.safetensors"
    save(ens, path)
    assert_same_state(load(path, lambda: mlp().to(dtype)), ens)
    with pytest.raises(
        ve.EnsembleError, match=rf"'0.weight' is {dtype} in the file, torch.float32"
    ):
        load(path, mlp)


def test_template_module_is_used_and_left_untouched(saved):
    ens, path = saved
    template = mlp()
    before = {k: v.clone() for k, v in template.state_dict().items()}
    back = load(path, template)
    assert_same_state(back, ens)
    for k, v in template.state_dict().items():
        assert torch.equal(v, before[k]) and v.shape == before[k].shape


def test_requires_grad_comes_from_the_file(tmp_path):
    ens = ve.Ensemble.from_factory(mlp, 2)
    ens._template[0].weight.requires_grad_(False)
    save(ens, tmp_path / "e.safetensors")
    back = load(tmp_path / "e.safetensors", mlp)
    assert [p.requires_grad for p in back.parameters()] == [False, True, True, True]


def test_map_location(saved):
    _, path = saved
    back = load(path, mlp, map_location=torch.device("cpu"))
    assert all(t.device.type == "cpu" for t in back.state_dict().values())
    meta = load(path, mlp, map_location="meta")
    assert all(t.device.type == "meta" for t in meta.state_dict().values())
    with pytest.raises(ve.EnsembleError, match="map_location must be a device"):
        load(path, mlp, map_location=1.5)  # type: ignore[arg-type]


def test_ensemble_options_and_a_meta_template(saved):
    ens, path = saved
    back = load(path, mlp, backend="loop", randomness="same", chunk_size=2)
    assert (back.backend, back.randomness, back.chunk_size) == ("loop", "same", 2)
    with pytest.raises(ve.EnsembleError, match="backend must be one of"):
        load(path, mlp, backend="fast")
    with torch.device("meta"):
        template = mlp()  # no memory, no initialisation: every tensor comes from the file
    back = load(path, template, backend="loop")
    assert_same_state(back, ens)
    x = torch.randn(4, 6)
    ens.backend = "loop"
    torch.testing.assert_close(back(x), ens(x), atol=0, rtol=0)  # same state, same computation


def test_load_without_preadv_and_pread(saved, monkeypatch):
    """The code path of platforms without os.preadv / os.pread (Windows)."""
    ens, path = saved
    monkeypatch.delattr(os, "preadv")
    monkeypatch.delattr(os, "pread")
    assert_same_state(load(path, mlp), ens)


def test_loaded_tensors_do_not_depend_on_the_file(saved):
    ens, path = saved
    back = load(path, mlp)
    path.write_bytes(b"\0" * path.stat().st_size)  # overwrite in place
    path.unlink()
    assert_same_state(back, ens)


# ----------------------------------------------------------------------------- optimizer state


def _train(ens: ve.Ensemble, opt: torch.optim.Optimizer, steps: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(8, 6, generator=gen)
        y = torch.randn(len(ens), 8, 3, generator=gen)
        opt.zero_grad()
        ((ens(x) - y) ** 2).mean(dim=(1, 2)).sum().backward()
        opt.step()


@pytest.mark.parametrize(
    "make_opt",
    [
        lambda ps: torch.optim.Adam(ps, lr=1e-2, betas=(0.8, 0.95)),
        lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9),
        lambda ps: torch.optim.AdamW(
            [{"params": ps[:2], "lr": 1e-2}, {"params": ps[2:], "lr": 3e-3}], weight_decay=0.1
        ),
    ],
    ids=["adam", "sgd_momentum", "adamw_two_groups"],
)
def test_training_resumes_from_a_file_exactly(tmp_path, make_opt):
    # backend="loop": the same kernels in both runs (auto may pick kernels by timing them)
    ens = ve.Ensemble.from_factory(mlp, 3, seed=0, backend="loop")
    opt = make_opt(list(ens.parameters()))
    _train(ens, opt, 3, seed=1)
    path = tmp_path / "ckpt.safetensors"
    save(ens, path, optimizer=opt)
    _train(ens, opt, 3, seed=2)  # the uninterrupted run: the reference

    resumed = ve.Ensemble.from_factory(mlp, 3, seed=99, backend="loop")
    params = list(resumed.parameters())
    opt2 = make_opt(params)
    assert load(path, resumed, optimizer=opt2) is resumed
    assert [id(p) for p in resumed.parameters()] == [id(p) for p in params]
    _train(resumed, opt2, 3, seed=2)
    assert_same_state(resumed, ens)
    assert_tree_equal(opt2.state_dict(), opt.state_dict())


def test_optimizer_mistakes_are_refused(saved, tmp_path):
    ens, path = saved
    other = ve.Ensemble.from_factory(mlp, 3)
    with pytest.raises(
        ve.EnsembleError, match=r"param_groups\[0\]\['params'\]\[0\] is not a parameter"
    ):
        save(ens, tmp_path / "x.safetensors", optimizer=torch.optim.SGD(other.parameters(), lr=1))
    with pytest.raises(ve.EnsembleError, match="without state_dict"):
        save(ens, tmp_path / "x.safetensors", optimizer=object())
    with pytest.raises(ve.EnsembleError, match="only be restored together with the ensemble"):
        load(path, mlp, optimizer=torch.optim.SGD(other.parameters(), lr=1))
    with pytest.raises(ve.EnsembleError, match="holds no optimizer state"):
        load(path, other, optimizer=torch.optim.SGD(other.parameters(), lr=1))
    opt = torch.optim.SGD(ens.parameters(), lr=1, momentum=0.9)
    _train(ens, opt, 1, seed=0)
    save(ens, path, optimizer=opt)
    two_groups = torch.optim.SGD([{"params": [other._template[0].weight]}], lr=1)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(ve.EnsembleError, match=r"groups of sizes \[4\]; the optimizer has .*\[1\]"):
        load(path, other, optimizer=two_groups)
    for k, v in other.state_dict().items():  # nothing was loaded
        assert torch.equal(v, before[k])
    with pytest.raises(ve.EnsembleError, match="the ensemble it is loaded into has 2"):
        load(path, ve.Ensemble.from_factory(mlp, 2))
    with pytest.raises(ve.EnsembleError, match="map_location and Ensemble options apply to a new"):
        load(path, other, map_location="cpu")
    with pytest.raises(ve.EnsembleError, match="map_location and Ensemble options apply to a new"):
        load(path, other, backend="loop")


def test_optimizer_state_that_cannot_be_stored_is_refused(saved, tmp_path):
    ens, _ = saved

    class Odd:
        def state_dict(self) -> dict[str, Any]:
            return {"state": {}, "param_groups": [{"params": [], "fn": print}]}

    with pytest.raises(ve.EnsembleError, match="'/param_groups/0/fn' is a builtin_function"):
        save(ens, tmp_path / "x.safetensors", optimizer=Odd())
    assert not (tmp_path / "x.safetensors").exists()


# ----------------------------------------------------------------------------- bad files


class RunsCode:
    """A pickle payload that creates a file when unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.marker,))


def _payload_files(tmp_path: Path, marker: Path) -> list[Path]:
    raw = tmp_path / "evil_raw.pt"
    raw.write_bytes(pickle.dumps({"0.weight": RunsCode(marker)}))
    zipped = tmp_path / "evil_zip.pt"
    torch.save({"0.weight": RunsCode(marker)}, zipped)
    disguised = tmp_path / "evil.safetensors"
    disguised.write_bytes(raw.read_bytes())
    return [raw, zipped, disguised]


def test_the_pickle_payloads_are_live(tmp_path):
    """The control: an unsafe unpickler does run them (so the next test proves something)."""
    raw, zipped, _ = _payload_files(tmp_path, tmp_path / "ran")
    pickle.loads(raw.read_bytes())
    assert (tmp_path / "ran").exists()
    (tmp_path / "ran").unlink()
    torch.load(zipped, weights_only=False)
    assert (tmp_path / "ran").exists()


def test_pickled_payloads_never_run(tmp_path):
    marker = tmp_path / "ran"
    for path in _payload_files(tmp_path, marker):
        with pytest.raises(ve.EnsembleError, match="not a readable safetensors file"):
            load(path, mlp)
        with pytest.raises(ve.EnsembleError, match=r"checkpoint 0 .*(weights_only|safetensors)"):
            from_checkpoints([path], mlp)
        assert main(["inspect", str(path)]) == 1
    assert not marker.exists()


def _truncations(size: int) -> list[int]:
    return [0, 4, 8, 9, 100, size // 2, size - 1]


def test_truncated_files_are_refused(saved, tmp_path):
    _, path = saved
    data = path.read_bytes()
    for cut in _truncations(len(data)):
        bad = tmp_path / f"cut{cut}.safetensors"
        bad.write_bytes(data[:cut])
        with pytest.raises(ve.EnsembleError, match=str(bad)):
            load(bad, mlp)


def test_random_bytes_are_refused(tmp_path):
    gen = torch.Generator().manual_seed(0)
    for size in (0, 7, 64, 4096):
        bad = tmp_path / f"rand{size}.safetensors"
        bad.write_bytes(
            bytes(torch.randint(0, 256, (size,), generator=gen, dtype=torch.uint8).tolist())
        )
        with pytest.raises(ve.EnsembleError, match="not a readable safetensors file"):
            load(bad, mlp)


def test_a_flipped_bit_in_the_weights_is_caught_by_the_checksum(saved, tmp_path):
    _, path = saved
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x10  # inside the last tensor's bytes
    bad = tmp_path / "flip.safetensors"
    bad.write_bytes(bytes(data))
    with pytest.raises(ve.EnsembleError, match="does not match its checksum"):
        load(bad, mlp)
    into = ve.Ensemble.from_factory(mlp, 3, seed=5)
    before = {k: v.clone() for k, v in into.state_dict().items()}
    with pytest.raises(ve.EnsembleError, match="does not match its checksum"):
        load(bad, into)
    for k, v in into.state_dict().items():  # loading in place changed nothing
        assert torch.equal(v, before[k])


class _Tempered(nn.Module):
    def __init__(self, temperature: float = 1.0) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.temperature = temperature

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(x) / self.temperature


def test_a_file_saved_after_annealing_a_setting_says_how_to_load_it(tmp_path):
    ens = ve.Ensemble.from_factory(_Tempered, 3, seed=0)
    ens.temperature = 0.5
    path = tmp_path / "annealed.safetensors"
    save(ens, path)
    with pytest.raises(ve.EnsembleError, match="Only settings differ") as err:
        load(path, _Tempered)
    assert "root module attribute 'temperature' is 0.5 in the file, 1.0 in the model" in str(
        err.value
    )
    loaded = load(path, lambda: _Tempered(0.5))
    x = torch.randn(5, 4)
    torch.testing.assert_close(loaded(x), ens(x))
    with pytest.raises(ve.EnsembleError) as err:  # (no such hint for other differences)
        load(path, lambda: nn.Linear(4, 3))
    assert "Only settings differ" not in str(err.value)
    dropout = ve.Ensemble.from_factory(lambda: nn.Sequential(nn.Linear(4, 3), nn.Dropout(0.5)), 2)
    dropout.get_submodule("1").p = 0.1  # a torch layer's setting annealed
    save(dropout, tmp_path / "dropout.safetensors")
    with pytest.raises(ve.EnsembleError, match="Only settings differ"):
        load(
            tmp_path / "dropout.safetensors",
            lambda: nn.Sequential(nn.Linear(4, 3), nn.Dropout(0.5)),
        )


def test_another_architecture_is_refused_naming_every_difference(saved):
    _, path = saved

    def wider() -> nn.Module:
        return nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, 3))

    with pytest.raises(ve.EnsembleError) as err:
        load(path, wider)
    msg = str(err.value)
    assert "different architecture" in msg
    assert "parameter '0.weight' has shape (16, 6) in the file, (32, 6) in the model" in msg
    assert "parameter '2.weight' has shape (3, 16) in the file, (3, 32) in the model" in msg

    def shorter() -> nn.Module:
        return nn.Sequential(nn.Linear(6, 16), nn.ReLU())

    with pytest.raises(
        ve.EnsembleError,
        match=r"parameters in the file but not in the model: \['2.bias', '2.weight'\]",
    ):
        load(path, shorter)
    with pytest.raises(ve.EnsembleError, match="module '1' is ReLU in the file, Tanh in the model"):
        load(path, lambda: nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)))
    with pytest.raises(
        ve.EnsembleError, match="the file holds a Sequential, the model is a Linear"
    ):
        load(path, lambda: nn.Linear(6, 3))


def test_a_different_member_count_is_refused(saved):
    _, path = saved
    with pytest.raises(ve.EnsembleError, match="holds 3 members, but n=5 members were asked for"):
        load(path, mlp, n=5)
    with pytest.raises(ve.EnsembleError, match="n must be a positive int"):
        load(path, mlp, n=0)


def test_missing_files_and_folders_are_refused(tmp_path):
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(ve.EnsembleError, match="does not exist"):
        load(missing, mlp)
    with pytest.raises(ve.EnsembleError, match="is a folder, expected a file"):
        load(tmp_path, mlp)
    torch.save(mlp().state_dict(), tmp_path / "a.pt")
    with pytest.raises(ve.EnsembleError, match=r"checkpoint 1 .* does not exist"):
        from_checkpoints([tmp_path / "a.pt", missing], mlp)
    with pytest.raises(ve.EnsembleError, match=r"checkpoint 0 .* is a folder"):
        from_checkpoints([tmp_path], mlp)


def test_save_refuses_folders_and_missing_folders_and_non_ensembles(tmp_path):
    ens = ve.Ensemble.from_factory(mlp, 2)
    with pytest.raises(ve.EnsembleError, match="it is a folder"):
        save(ens, tmp_path)
    with pytest.raises(ve.EnsembleError, match="does not exist"):
        save(ens, tmp_path / "no" / "such" / "e.safetensors")
    with pytest.raises(ve.EnsembleError, match="save expects an Ensemble, got a Sequential"):
        save(mlp(), tmp_path / "e.safetensors")  # type: ignore[arg-type]


def test_a_plain_safetensors_file_and_a_newer_format_are_refused(saved, tmp_path):
    _, path = saved
    plain = tmp_path / "plain.safetensors"
    st_torch.save_file(mlp().state_dict(), plain)
    with pytest.raises(ve.EnsembleError, match=r"not a vensemble ensemble file.*from_checkpoints"):
        load(plain, mlp)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    newer = tmp_path / "newer.safetensors"
    st_torch.save_file(
        st_torch.load_file(path), newer, metadata={**meta, "vensemble.format_version": "2"}
    )
    with pytest.raises(ve.EnsembleError, match=r"uses vensemble file format 2.*upgrade vensemble"):
        load(newer, mlp)


def test_a_failed_write_keeps_the_previous_file(saved, monkeypatch):
    ens, path = saved
    before = path.read_bytes()
    other = ve.Ensemble.from_factory(mlp, 3, seed=7)

    def disk_full(fd: int) -> None:
        raise OSError(28, "No space left on device")

    real_pwrite = os.pwrite
    calls = []

    def full_after_one_write(fd: int, data: Any, at: int) -> int:
        calls.append(at)
        if len(calls) > 1:
            raise OSError(28, "No space left on device")
        return real_pwrite(fd, data, at)

    for name, fake in (("fsync", disk_full), ("pwrite", full_after_one_write)):
        with monkeypatch.context() as m:
            m.setattr(os, name, fake)
            with pytest.raises(OSError, match="No space left"):
                save(other, path)
        assert path.read_bytes() == before
        assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temp left
    assert len(calls) > 1
    assert_same_state(load(path, mlp), ens)


# ----------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
@pytest.mark.parametrize("name", ["mlp", "cnn_bn", "tied", "lstm"])
def test_from_checkpoints_equals_the_members(tmp_path, name, suffix):
    factory = ZOO[name][0]
    members = []
    for i in range(3):
        torch.manual_seed(i)
        members.append(factory())
    paths = []
    for i, m in enumerate(members):
        p = tmp_path / f"m{i}{suffix}"
        if suffix == ".pt":
            torch.save(m.state_dict(), p)
        else:
            st_torch.save_model(m, str(p))  # keeps one name of a tied weight
        paths.append(p)
    ens = from_checkpoints(paths, factory, backend="loop")
    assert len(ens) == 3
    assert_same_state(ens, ve.Ensemble(members))
    ens.eval()
    x = zoo_input(name, 4, torch.float32)
    same = ve.Ensemble(members, backend="loop").eval()
    torch.testing.assert_close(ens(x), same(x), atol=0, rtol=0)  # same state, same computation
    expected = torch.stack([m.eval()(x) for m in members])  # the members alone: their GEMMs
    torch.testing.assert_close(ens(x), expected, atol=1e-6, rtol=1e-6)  # see the round trip
    if name == "tied":
        assert ens._template.out.weight is ens._template.emb.weight


def test_from_checkpoints_refuses_what_does_not_fit(tmp_path):
    good = tmp_path / "good.pt"
    torch.save(mlp().state_dict(), good)

    def ckpt(name: str, state: Any) -> Path:
        p = tmp_path / name
        torch.save(state, p)
        return p

    sd = mlp().state_dict()
    missing = ckpt("missing.pt", {k: v for k, v in sd.items() if k != "2.bias"})
    with pytest.raises(
        ve.EnsembleError, match=r"checkpoint 1 .*missing keys \['2.bias'\], unexpected keys \[\]"
    ):
        from_checkpoints([good, missing], mlp)
    extra = ckpt("extra.pt", {**sd, "3.weight": torch.zeros(1)})
    with pytest.raises(ve.EnsembleError, match=r"unexpected keys \['3.weight'\]"):
        from_checkpoints([extra], mlp)
    shape = ckpt("shape.pt", {**sd, "0.weight": torch.zeros(8, 6)})
    with pytest.raises(
        ve.EnsembleError,
        match=r"checkpoint 2 .*'0.weight' has shape \(8, 6\), the model's is \(16, 6\)",
    ):
        from_checkpoints([good, good, shape], mlp)
    nested = ckpt("nested.pt", {"epoch": 3, "model": sd})
    with pytest.raises(
        ve.EnsembleError,
        match=r"missing keys \['0.bias', '0.weight', '2.bias', '2.weight'\], unexpected keys \['epoch', 'model'\]",
    ):
        from_checkpoints([nested], mlp)
    listed = ckpt("list.pt", [1, 2])
    with pytest.raises(ve.EnsembleError, match="holds a list, expected a state_dict"):
        from_checkpoints([listed], mlp)
    tied = Tied().state_dict()
    tied["out.weight"] = tied["out.weight"].clone() + 1
    untied = ckpt("untied.pt", tied)
    with pytest.raises(
        ve.EnsembleError, match=r"'emb.weight' and 'out.weight' are one tied tensor"
    ):
        from_checkpoints([untied], Tied)
    with pytest.raises(ve.EnsembleError, match="at least one checkpoint"):
        from_checkpoints([], mlp)
    with pytest.raises(ve.EnsembleError, match="must be a list of checkpoint paths"):
        from_checkpoints(str(good), mlp)  # type: ignore[arg-type]


class WithCache(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 3)
        self.register_buffer("cache", torch.arange(3.0), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(x) + self.cache


def test_non_persistent_buffers_come_from_the_model(tmp_path):
    paths = []
    for i in range(2):
        p = tmp_path / f"m{i}.pt"
        torch.save(WithCache().state_dict(), p)
        paths.append(p)
    ens = from_checkpoints(paths, WithCache)
    assert torch.equal(ens._template.cache, torch.arange(3.0).expand(2, 3))


@pytest.mark.parametrize("fmt", ["safetensors", "pt"])
def test_export_writes_plain_checkpoints(tmp_path, fmt):
    ens = ve.Ensemble.from_factory(Tied, 3, seed=0)
    paths = export(ens, tmp_path / "out", format=fmt)
    assert [p.name for p in paths] == [f"member_{i:03d}.{fmt}" for i in range(3)]
    x = torch.randint(0, 11, (5, 4))
    for i, p in enumerate(paths):
        model = Tied()  # plain PyTorch from here on
        if fmt == "pt":
            model.load_state_dict(torch.load(p, weights_only=True))
        else:
            missing, unexpected = st_torch.load_model(model, p)
            assert not missing and not unexpected
        assert model.out.weight is model.emb.weight
        torch.testing.assert_close(model(x), ens.member(i)(x), atol=0, rtol=0)
    assert_same_state(from_checkpoints(paths, Tied), ens)


def test_export_of_an_untied_model_loads_with_load_state_dict(tmp_path):
    ens = ve.Ensemble.from_factory(mlp, 2)
    paths = export(ens, tmp_path)
    model = mlp()
    model.load_state_dict(st_torch.load_file(paths[1]))
    assert_same_state(model, ens.member(1))
    (tmp_path / "file").write_text("")
    with pytest.raises(ve.EnsembleError, match="it is a file, expected a folder"):
        export(ens, tmp_path / "file")
    with pytest.raises(ve.EnsembleError, match="format must be 'safetensors' or 'pt'"):
        export(ens, tmp_path, format="npz")


# ----------------------------------------------------------------------------- inspect


def test_inspect_prints_members_dtype_counts_size_and_architecture(saved, capsys):
    ens, path = saved
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    per_member = sum(p.numel() for p in ens.member(0).parameters())
    assert f"{path.stat().st_size:,} bytes" in out
    assert "members:     3" in out
    assert "dtypes:      torch.float32" in out
    assert f"parameters:  {per_member:,} per member, {3 * per_member:,} in all" in out
    assert "0: Linear(in_features=6, out_features=16, bias=True)" in out
    assert "1: ReLU()" in out
    assert f"vensemble.version: {ve.__version__}" in out

    assert main(["inspect", "--json", str(path)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["members"] == 3 and summary["parameters_total"] == 3 * per_member
    assert summary["size_bytes"] == path.stat().st_size
    assert [m["class"].rsplit(".", 1)[-1] for m in summary["architecture"]] == [
        "Sequential",
        "Linear",
        "ReLU",
        "Linear",
    ]


def test_inspect_counts_tied_weights_once_and_reports_optimizer_state(tmp_path, capsys):
    ens = ve.Ensemble.from_factory(Tied, 2)
    opt = torch.optim.Adam(ens.parameters())
    ens(torch.randint(0, 11, (3, 4))).sum().backward()
    opt.step()
    path = tmp_path / "t.safetensors"
    save(ens, path, optimizer=opt)
    assert main(["inspect", "--json", str(path)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["parameters_per_member"] == sum(p.numel() for p in Tied().parameters())
    assert summary["tied"] == {"out.weight": "emb.weight"}
    state = [t for s in opt.state_dict()["state"].values() for t in s.values()]  # step, m, v
    nbytes = sum(t.numel() * t.element_size() for t in state)
    assert summary["optimizer"] == {"tensors": len(state), "bytes": nbytes}


def test_inspect_reports_bad_files(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "missing")]) == 1
    assert "does not exist" in capsys.readouterr().err
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(struct.pack("<Q", 10**6) + b"{}")
    assert main(["inspect", str(bad)]) == 1
    assert "not a readable safetensors file" in capsys.readouterr().err


def test_a_changed_optimizer_state_is_caught_by_its_crc(tmp_path):
    """The optimizer's JSON (hyperparameters, step counts) is metadata, not a tensor: it has
    a CRC-32 of its own."""
    ens = ve.Ensemble.from_factory(mlp, 3, seed=0)
    opt = torch.optim.Adam(ens.parameters(), lr=1e-3)
    ens(torch.randn(4, 6)).sum().backward()
    opt.step()
    path = tmp_path / "opt.safetensors"
    ve.save(ens, path, optimizer=opt)
    data = path.read_bytes()
    old, new = b'lr\\", 0.001]', b'lr\\", 0.003]'  # (JSON inside the header's JSON)
    assert data.count(old) == 1
    bad = tmp_path / "opt_bad.safetensors"
    bad.write_bytes(data.replace(old, new))
    opt2 = torch.optim.Adam(ens.parameters(), lr=1e-3)
    with pytest.raises(ve.EnsembleError, match="optimizer state does not match its CRC-32"):
        ve.load(bad, ens, optimizer=opt2)
    ve.load(path, ens, optimizer=opt2)  # the intact file loads
    assert opt2.param_groups[0]["lr"] == 1e-3


@pytest.mark.parametrize("fmt", ["safetensors", "pt"])
def test_exporting_fewer_members_into_an_old_export_is_refused(tmp_path, fmt):
    """Stale member files would be read back as members by a glob over the folder."""
    ve.export(ve.Ensemble.from_factory(mlp, 4, seed=0), tmp_path, format=fmt)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    smaller = ve.Ensemble.from_factory(mlp, 2, seed=7)
    with pytest.raises(ve.EnsembleError, match=rf"member_002.{fmt}, member_003.{fmt} \(2 file"):
        ve.export(smaller, tmp_path, format=fmt)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # nothing written
    again = ve.export(ve.Ensemble.from_factory(mlp, 4, seed=1), tmp_path, format=fmt)
    assert len(again) == 4  # the same names: replaced


def test_save_through_a_symlink_writes_the_file_it_points_to(tmp_path):
    # the link itself was replaced: the file it pointed to kept the old ensemble
    old = ve.Ensemble.from_factory(mlp, 3, seed=0)
    new = ve.Ensemble.from_factory(mlp, 5, seed=1)
    target = tmp_path / "run1.safetensors"
    save(old, target)
    link = tmp_path / "latest.safetensors"
    link.symlink_to(target.name)
    save(new, link)
    assert link.is_symlink() and os.readlink(link) == target.name
    back = load(target, mlp)
    assert len(back) == 5
    for key, value in new.state_dict().items():
        torch.testing.assert_close(back.state_dict()[key], value, atol=0, rtol=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == [link.name, target.name]


def test_save_takes_the_longest_name_the_file_system_takes(tmp_path):
    # the temporary file's name added 18 bytes: names of 238-255 bytes failed (OSError)
    ens = ve.Ensemble.from_factory(mlp, 2, seed=0)
    path = tmp_path / ("m" * (255 - len(".safetensors")) + ".safetensors")
    save(ens, path)
    assert len(load(path, mlp)) == 2
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_from_checkpoints_takes_batchnorm_weights_without_step_counts(tmp_path):
    # a state dict without num_batches_tracked (safetensors keeps no version) loads into the
    # model with strict=True, torch's BatchNorm filling 0; from_checkpoints refused it
    def make() -> nn.Module:
        return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))

    paths, members = [], []
    for i in range(2):
        torch.manual_seed(i)
        m = make()
        m(torch.randn(5, 4))  # running stats and a count of 1
        sd = {k: v for k, v in m.state_dict().items() if not k.endswith("num_batches_tracked")}
        st_torch.save_file(sd, tmp_path / f"m{i}.safetensors")
        paths.append(tmp_path / f"m{i}.safetensors")
        alone = make()
        alone.load_state_dict(st_torch.load_file(paths[-1]), strict=True)
        members.append(alone)
    ens = ve.Ensemble.from_checkpoints(paths, make)
    for i, alone in enumerate(members):
        for key, value in alone.state_dict().items():
            torch.testing.assert_close(ens.member(i).state_dict()[key], value, msg=key)
    assert ens.get_buffer("1.num_batches_tracked").tolist() == [0, 0]
    with pytest.raises(ve.EnsembleError, match=r"missing keys \['1.running_mean'\]"):
        st_torch.save_file(
            {k: v for k, v in members[0].state_dict().items() if k != "1.running_mean"},
            tmp_path / "bad.safetensors",
        )
        ve.Ensemble.from_checkpoints([tmp_path / "bad.safetensors"], make)


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels-last"])
def test_a_fused_torch_optimizer_resumes_as_if_never_interrupted(tmp_path, channels_last):
    """Files hold optimizer state contiguous; torch's fused Adam pairs a parameter's elements
    with its state's by position in memory, so the loaded moments are laid out as their
    parameters (in-major Linear weights, channels-last conv weights): before, the resumed
    run drifted by 0.15 after one step."""

    def member(i: int) -> nn.Module:
        torch.manual_seed(i)
        m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
        return m.to(memory_format=torch.channels_last) if channels_last else m

    x = torch.randn(2, 3, 8, 8)

    def step(ens: ve.Ensemble, opt: torch.optim.Optimizer) -> None:
        opt.zero_grad()
        ens(x).square().sum().backward()
        opt.step()

    a = ve.Ensemble([member(i) for i in range(2)], backend="loop")
    opt_a = torch.optim.Adam(a.parameters(), lr=0.1, fused=True)
    step(a, opt_a)
    step(a, opt_a)
    ve.save(a, tmp_path / "c.safetensors", optimizer=opt_a)
    b = ve.Ensemble([member(10 + i) for i in range(2)], backend="loop")
    opt_b = torch.optim.Adam(b.parameters(), lr=0.1, fused=True)
    ve.load(tmp_path / "c.safetensors", b, optimizer=opt_b)
    for p in b.parameters():
        assert opt_b.state[p]["exp_avg"].stride() == p.stride()
    step(a, opt_a)
    step(b, opt_b)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pb, pa, atol=0, rtol=0, msg=name)


def _opt_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))


def _opt_loss(ens: ve.Ensemble, x: Tensor) -> Tensor:
    return ens(x).pow(2).mean(dim=(1, 2)).sum()


@pytest.mark.parametrize(("saved", "loaded"), [("SGD", "Adam"), ("Adam", "SGD")])
def test_another_kind_of_optimizers_state_is_refused_and_changes_nothing(tmp_path, saved, loaded):
    """An SGD file into Adam was refused only after torch had replaced Adam's state and
    groups (its next step raised KeyError: 'betas'); an Adam file into SGD loaded silently."""
    x = torch.randn(4, 5, dtype=torch.float64)
    kwargs = {"SGD": {"lr": 0.1, "momentum": 0.9}, "Adam": {"lr": 0.1}}
    ens = ve.Ensemble.from_factory(_opt_mlp, 3, seed=0).double()
    opt = ve.MemberOptimizer(getattr(torch.optim, saved), ens, **kwargs[saved])
    _opt_loss(ens, x).backward()
    opt.step()
    path = tmp_path / "a.safetensors"
    save(ens, path, optimizer=opt)
    other = ve.Ensemble.from_factory(_opt_mlp, 3, seed=1).double()
    weights = {k: v.clone() for k, v in other.state_dict().items()}
    target = ve.MemberOptimizer(getattr(torch.optim, loaded), other, **kwargs[loaded])
    groups = target.state_dict()["param_groups"]
    with pytest.raises(ve.EnsembleError, match=r"another kind of optimizer.*the same class"):
        load(path, other, optimizer=target)
    assert target.state_dict()["param_groups"] == groups and not target.state
    for k, v in other.state_dict().items():
        assert torch.equal(v, weights[k]), k
    _opt_loss(other, x).backward()
    target.step()  # (it still steps)


def test_a_refused_optimizer_state_leaves_the_optimizer_as_it_was(tmp_path):
    """torch's load_state_dict replaces the state and groups, then may raise: put back."""

    class Picky(torch.optim.Adam):
        refuse = False

        def __setstate__(self, state: dict[str, Any]) -> None:
            super().__setstate__(state)
            if type(self).refuse:
                type(self).refuse = False
                raise KeyError("step")

    x = torch.randn(4, 5)
    ens = ve.Ensemble.from_factory(_opt_mlp, 3, seed=0)
    opt = Picky(ens.parameters(), lr=0.1)
    _opt_loss(ens, x).backward()
    opt.step()
    save(ens, tmp_path / "a.safetensors", optimizer=opt)
    state, groups = opt.state, opt.param_groups
    Picky.refuse = True
    with pytest.raises(ve.EnsembleError, match="refused the saved state: KeyError"):
        load(tmp_path / "a.safetensors", ens, optimizer=opt)
    assert opt.state is state and opt.param_groups is groups
    opt.step()


def test_a_member_optimizers_state_loads_into_a_plain_optimizer_in_its_parameters_shape(tmp_path):
    """A MemberOptimizer keeps Adam's moments over its views of the parameters (in-major
    Linear weights: (N, in, out)); a plain torch optimizer's are parameter-shaped. The file's
    moments kept the views' shape there: an unfused step raised."""
    x = torch.randn(4, 5, dtype=torch.float64)
    ens = ve.Ensemble.from_factory(_opt_mlp, 3, seed=0).double()
    member_opt = ve.MemberOptimizer(torch.optim.Adam, ens, lr=0.1, foreach=False)
    for _ in range(2):
        member_opt.zero_grad()
        _opt_loss(ens, x).backward()
        member_opt.step()
    save(ens, tmp_path / "a.safetensors", optimizer=member_opt)
    other = ve.Ensemble.from_factory(_opt_mlp, 3, seed=1).double()
    plain = torch.optim.Adam(other.parameters(), lr=0.1, foreach=False)
    load(tmp_path / "a.safetensors", other, optimizer=plain)
    for param in other.parameters():
        assert plain.state[param]["exp_avg"].shape == param.shape
    assert "members" not in plain.param_groups[0]
    for opt, model in ((member_opt, ens), (plain, other)):  # one more step each: the same
        opt.zero_grad()
        _opt_loss(model, x).backward()
        opt.step()
    for (k, a), b in zip(ens.state_dict().items(), other.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0, msg=k)


@pytest.mark.parametrize("width", [4, 6], ids=["square", "wide"])
def test_a_plain_optimizers_state_loads_into_a_member_optimizer(tmp_path, width):
    """A plain torch optimizer's file holds parameter-shaped moments; a MemberOptimizer keeps
    them over in-major views. They were taken to be in its own layout: transposed for square
    weights (training went on with wrong moments), refused for the others."""

    def make() -> nn.Module:
        return nn.Sequential(nn.Linear(4, width), nn.Tanh(), nn.Linear(width, 4))

    x, y = torch.randn(8, 4, dtype=torch.float64), torch.randn(8, 4, dtype=torch.float64)

    def steps(ens: ve.Ensemble, opt: Any, k: int) -> None:
        for _ in range(k):
            opt.zero_grad()
            ((ens(x) - y) ** 2).mean(dim=(1, 2)).sum().backward()
            opt.step()

    ens = ve.Ensemble.from_factory(make, 3, seed=0).double()
    opt = torch.optim.Adam(ens.parameters(), lr=1e-2)
    steps(ens, opt, 3)
    save(ens, tmp_path / "c.safetensors", optimizer=opt)
    steps(ens, opt, 3)
    other = ve.Ensemble.from_factory(make, 3, seed=5).double()
    member_opt = ve.MemberOptimizer(torch.optim.Adam, other, lr=1e-2)
    load(tmp_path / "c.safetensors", other, optimizer=member_opt)
    steps(other, member_opt, 3)
    for (k, a), b in zip(ens.state_dict().items(), other.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0, msg=k)

"""Ensemble files under abuse: fuzzed bytes load equal or raise EnsembleError; a killed save
leaves the old file or the new one, whole."""

from __future__ import annotations

import functools
import random
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import hypothesis.strategies as st
import torch
from hypothesis import HealthCheck, given, settings
from torch import nn

import vensemble as ve
from vensemble.io import load, save


def small() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))


@functools.cache
def original() -> tuple[bytes, dict[str, torch.Tensor], int]:
    """A real small file, the state it holds, and where its tensor data starts."""
    ens = ve.Ensemble.from_factory(small, 2, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ens.safetensors"
        save(ens, path)
        data = path.read_bytes()
    header_end = 8 + int.from_bytes(data[:8], "little")
    return data, {k: v.clone() for k, v in ens.state_dict().items()}, header_end


_SIZE = len(original()[0])
_HEADER = original()[2]
_anywhere = st.integers(0, _SIZE)
_in_header = st.integers(8, _HEADER - 1)  # the JSON header: metadata, names, shapes, offsets
_in_data = st.integers(_HEADER, _SIZE - 1)  # the tensor bytes
_mutation = st.one_of(
    st.tuples(st.just("flip"), st.one_of(_anywhere, _in_data), st.integers(0, 7)),
    st.tuples(st.just("set"), _in_header, st.integers(32, 126)),  # stays valid UTF-8
    st.tuples(st.just("set"), st.integers(0, 7), st.integers(0, 255)),  # the header length
    st.tuples(st.just("insert"), _anywhere, st.binary(min_size=1, max_size=8)),
    st.tuples(st.just("insert"), _in_header, st.sampled_from([b" ", b"0", b'"', b"1,", b"}"])),
    st.tuples(st.just("delete"), _anywhere, st.integers(1, 16)),
    st.tuples(st.just("truncate"), _anywhere),
)


def _mutate(data: bytes, mutations: list[tuple]) -> bytes:
    out = bytearray(data)
    for kind, pos, *arg in mutations:
        pos = min(pos, max(len(out) - 1, 0))
        if kind == "flip" and out:
            out[pos] ^= 1 << arg[0]
        elif kind == "set" and out:
            out[pos] = arg[0]
        elif kind == "insert":
            out[pos:pos] = arg[0]
        elif kind == "delete":
            del out[pos : pos + arg[0]]
        elif kind == "truncate":
            del out[pos:]
    return bytes(out)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_mutation, min_size=1, max_size=3))
def test_fuzzed_files_load_equal_or_raise_ensemble_error(mutations):
    data, state, _ = original()
    mutated = _mutate(data, mutations)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "fuzzed.safetensors"
        path.write_bytes(mutated)
        try:
            ens = load(path, small, n=2)
        except ve.EnsembleError:
            return  # refused, as it should be; anything else propagates and fails the test
    loaded = ens.state_dict()
    assert list(loaded) == list(state)
    for k, v in state.items():
        assert loaded[k].dtype == v.dtype and torch.equal(loaded[k], v), k


_CHILD = textwrap.dedent(
    """
    import sys, torch, vensemble as ve
    from vensemble.io import save
    torch.set_num_threads(1)
    make = lambda: torch.nn.Sequential(torch.nn.Linear(512, 512), torch.nn.Linear(512, 512))
    versions = [ve.Ensemble.from_factory(make, 10, seed=s) for s in (0, 100)]  # ~21 MB each
    i = int(sys.argv[2])
    save(versions[i % 2], sys.argv[1])
    print("ready", flush=True)
    while True:
        i += 1
        save(versions[i % 2], sys.argv[1])
    """
)


def _make() -> nn.Module:
    return nn.Sequential(nn.Linear(512, 512), nn.Linear(512, 512))


def test_a_save_killed_midway_leaves_the_old_or_the_new_file_whole(tmp_path):
    """Four children save in a loop, each to its own file, and are SIGKILLed at random moments."""
    versions = [ve.Ensemble.from_factory(_make, 10, seed=s).state_dict() for s in (0, 100)]
    rng = random.Random(0)
    folders = [tmp_path / f"child{i}" for i in range(4)]
    children = []
    for i, folder in enumerate(folders):
        folder.mkdir()
        cmd = [sys.executable, "-c", _CHILD, str(folder / "ens.safetensors"), str(i)]
        children.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True))
    try:
        for child in children:  # each has saved once and is now saving again and again
            assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        for child in children:
            time.sleep(rng.uniform(0.02, 0.3))
            child.send_signal(signal.SIGKILL)
    finally:
        for child in children:
            child.kill()
            child.wait(timeout=30)
            if child.stdout is not None:
                child.stdout.close()
    outcomes = []
    for i, folder in enumerate(folders):
        path = folder / "ens.safetensors"
        state = load(path, _make, n=10).state_dict()  # a damaged file raises EnsembleError
        match = [all(torch.equal(state[k], v[k]) for k in v) for v in versions]
        assert match.count(True) == 1, f"child {i}: the file is neither version"
        leftovers = [p.name for p in folder.iterdir() if p != path]
        assert all(name.startswith(".ens.safetensors.") for name in leftovers), leftovers
        outcomes.append((match.index(True), len(leftovers)))
    print("version found, temporary files left by the kill:", outcomes)


def test_single_bit_flips_load_equal_or_raises_ensemble_error(tmp_path):
    data, state, _ = original()
    path = tmp_path / "flipped.safetensors"
    header_end = original()[2]
    positions = [*range(0, header_end, 5), *range(header_end, len(data))]  # all tensor bytes
    refused = 0
    for pos in positions:
        mutated = bytearray(data)
        mutated[pos] ^= 1 << (pos % 8)
        path.write_bytes(bytes(mutated))
        try:
            loaded = load(path, small, n=2).state_dict()
        except ve.EnsembleError:
            refused += 1
            continue
        for k, v in state.items():
            assert torch.equal(loaded[k], v), (pos, k)
    assert refused > len(positions) // 2  # most flips damage something that matters

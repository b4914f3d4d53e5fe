"""The benchmark suite: `vensemble bench --quick` runs, reports ratios, and catches WRONG candidates."""

from __future__ import annotations

import json
import statistics
import time

import pytest
import torch

import vensemble._bench as bench
from vensemble._bench_candidates import (
    HAND,
    LOOP,
    PEAK,
    Candidate,
    Options,
    build_candidates,
    hand_batched_mlp,
    stacked_linears,
)
from vensemble._bench_measure import ATOL, measure_candidates
from vensemble._bench_memory import MemoryCase, run_memory_cases
from vensemble._bench_targets import Target
from vensemble._bench_workloads import main_workloads, mlp
from vensemble.backends import BACKENDS
from vensemble.cli import main

QUICK = ["bench", "--quick", "--rounds", "1", "--round-time", "0.002", "--no-peers"]
QUICK += ["--device", "cpu"]


def test_quick_bench_writes_json_and_png_with_a_row_per_candidate(tmp_path, capsys):
    out_json, out_png = tmp_path / "bench.json", tmp_path / "sweep.png"
    args = [*QUICK, "--workload", "small100", "--sweep", "--json", str(out_json)]
    assert main([*args, "--plot", str(out_png)]) == 0
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads(out_json.read_text())
    assert report["peak_gflops"] > 0 and report["machine"]["threads"] == 2
    assert report["rounds"] == 1
    assert [w["key"] for w in report["workloads"]] == ["small100"]
    assert [w["n"] for w in report["sweep"]] == [1, 4, 16]
    work = report["workloads"][0]
    rows = {r["candidate"]: r for r in work["rows"]}
    expected = {LOOP, "torch.func", *HAND, *(f"vensemble {b}" for b in BACKENDS)}
    assert expected <= set(rows)
    loop, peak = rows[LOOP]["samples"], rows[PEAK]["samples"]
    hand = [min(a, b) for a, b in zip(rows[HAND[0]]["samples"], rows[HAND[1]]["samples"])]
    for name in expected:
        row = rows[name]
        assert row["status"] == "ok", (name, row["note"])
        assert row["max_abs_diff"] <= ATOL
        assert len(row["samples"]) == 1 and row["time_s"] == statistics.median(row["samples"])
        assert row["min_s"] == min(row["samples"])
        assert row["gflops"] == pytest.approx(work["flops"] / row["time_s"] / 1e9)
        # ratios are taken round by round (one round here)
        assert row["speedup_vs_loop"] == pytest.approx(loop[0] / row["samples"][0])
        assert row["time_vs_hand"] == pytest.approx(row["samples"][0] / hand[0])
        rate, peak_rate = work["flops"] / row["samples"][0], 2 * 256**3 / peak[0]
        assert row["peak_share"] == pytest.approx(rate / peak_rate)
    assert rows[LOOP]["speedup_vs_loop"] == pytest.approx(1.0)
    assert min(rows[h]["time_vs_hand"] for h in HAND) == pytest.approx(1.0)
    assert rows[PEAK]["family"] == "peak" and rows[PEAK]["peak_share"] == pytest.approx(1.0)
    assert work["peak_gflops"] == pytest.approx(2 * 256**3 / peak[0] / 1e9)
    # compiled candidates are skipped with a note under --quick
    assert rows["torch.compile(torch.func)"]["status"] == "skipped"
    assert "--quick" in rows["torch.compile(torch.func)"]["note"]
    # the targets block has the small-members rows, with a verdict each
    small = [t for t in report["targets"] if t["target"].startswith("2 ")]
    assert len(small) == 2 and all(t["verdict"] and t["best"] is not None for t in small)
    printed = capsys.readouterr().out
    assert "| vensemble auto |" in printed and "### Targets" in printed and "N=16" in printed


def test_a_wrong_candidate_is_reported_wrong_and_not_timed(tmp_path, monkeypatch, capsys):
    def with_wrong_ones(w, models, x, opts):
        cands = build_candidates(w, models, x, opts)
        loop = cands[0].fn
        assert cands[0].name == LOOP and loop is not None
        cands.append(Candidate("vensemble off", "vensemble", lambda: loop() + 10 * ATOL))
        cands.append(Candidate("vensemble shape", "vensemble", lambda: loop()[:, :1]))
        cands.append(Candidate("almost", "hand", lambda: loop() + ATOL / 10))
        return cands

    monkeypatch.setattr(bench, "build_candidates", with_wrong_ones)
    out_json = tmp_path / "bench.json"
    code = main([*QUICK, "--workload", "tiny1000", "--json", str(out_json)])
    assert code == 1  # a vensemble candidate that differs from the loop fails the run
    rows = {r["candidate"]: r for r in json.loads(out_json.read_text())["workloads"][0]["rows"]}
    off, shape, almost = rows["vensemble off"], rows["vensemble shape"], rows["almost"]
    assert off["status"] == "WRONG" and off["time_s"] is None and off["speedup_vs_loop"] is None
    assert off["max_abs_diff"] == pytest.approx(10 * ATOL, rel=1e-2)
    assert shape["status"] == "WRONG" and "output (8, 1, 1)" in shape["note"]
    assert almost["status"] == "ok" and almost["time_s"] > 0
    assert "differs from the loop" in capsys.readouterr().err


def test_failures_and_compile_timeouts_are_reported_not_raised():
    x = torch.ones(3)

    def boom() -> torch.Tensor:
        raise RuntimeError("no batching rule\nmore")

    def slow_compile() -> torch.Tensor:
        time.sleep(5)
        return x

    rows = measure_candidates(
        [
            Candidate(LOOP, "baseline", lambda: x),
            Candidate("boom", "vensemble", boom),
            Candidate("slow", "baseline", slow_compile, compiled=True),
            Candidate("nan", "peer", lambda: x * float("nan")),
        ],
        rounds=1,
        round_time=0.001,
        compile_timeout=0.2,
    )
    by = {r.candidate: r for r in rows}
    assert (by["boom"].status, by["boom"].note) == ("FAILED", "RuntimeError: no batching rule")
    assert by["slow"].status == "FAILED" and "timed out" in by["slow"].note
    assert by["nan"].status == "WRONG"
    assert by[LOOP].status == "ok" and by[LOOP].time_s is not None


@pytest.mark.parametrize("shared", [True, False])
def test_hand_batched_mlp_equals_the_members(shared):
    models = [mlp((5, 7, 3)) for _ in range(4)]
    x = torch.randn(6, 5) if shared else torch.randn(4, 6, 5)
    expected = torch.stack([m(x if shared else x[i]) for i, m in enumerate(models)])
    layers = stacked_linears(models)
    with torch.no_grad():
        for wide in (False, True) if shared else (False,):
            got = hand_batched_mlp(layers, x, shared=shared, wide=wide)
            torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)


def test_every_backend_is_a_candidate_with_and_without_compile():
    w = main_workloads(quick=True)["small100"]
    models, x = w.members(), w.make_input()
    cands = build_candidates(w, models, x, Options(compile=True, peers=False))
    names = {c.name: c for c in cands}
    for backend in BACKENDS:
        assert names[f"vensemble {backend}"].fn is not None
        compiled = names[f"vensemble {backend} +compile"]
        # built when Ensemble(..., compile=True) builds, else skipped with the reason
        assert compiled.fn is not None or compiled.note.startswith("not built: ")
        assert compiled.fn is None or compiled.compiled
    assert names["torch.compile(torch.func)"].compiled


def test_targets_say_met_or_by_how_much_they_are_missed():
    assert Target("within", 1.21, 1.10, at_most=True).verdict() == "missed by 10%"
    assert Target("within", 1.05, 1.10, at_most=True).verdict() == "met"
    assert Target("faster", 8.0, 10.0, at_most=False).verdict() == "missed by 25%"
    assert Target("faster", 12.0, 10.0, at_most=False).verdict() == "met"
    assert Target("n/a", None, 1.0, at_most=True).verdict() == "not measured"


def test_memory_case_runs_in_a_subprocess_and_reports_the_output_size():
    (case,) = run_memory_cases([MemoryCase("vensemble auto", 32, 8, batch=16)], threads=1)
    assert case.error == ""
    assert case.output_mb == pytest.approx(32 * 16 * 1 * 4 / 2**20)
    assert case.peak_growth_mb is not None and case.peak_growth_mb >= 0


def test_peers_agree_with_the_loop_when_installed():
    pytest.importorskip("tensordict")
    from vensemble._bench_peers import peer_candidates

    w = main_workloads(quick=True)["tutorial2"]
    models, x = w.members(), w.make_input()
    peers = peer_candidates(w, models, x, torch.device("cpu"))
    runnable = [c for c in peers if c.fn is not None]
    assert "tensordict" in {c.name for c in runnable}
    loop = Candidate(LOOP, "baseline", lambda: torch.stack([m(x) for m in models]))
    rows = measure_candidates([loop, *runnable], rounds=1, round_time=0.001)
    assert all(r.status == "ok" for r in rows), [(r.candidate, r.note) for r in rows]

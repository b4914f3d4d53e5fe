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


def test_compile_backends_parses_a_comma_list_and_rejects_unknown_names(capsys):
    from vensemble.cli import build_parser

    parse = build_parser().parse_args
    assert parse(["bench"]).compile_backends is None  # default: every backend
    assert parse(["bench", "--compile-backends", "fused, auto"]).compile_backends == (
        "fused",
        "auto",
    )
    assert parse(["bench", "--compile-backends", "none"]).compile_backends == ()
    rerun = bench._command(parse(["bench", "--compile-backends", "fused,auto"]))
    assert rerun == "vensemble bench --compile-backends fused,auto"
    with pytest.raises(SystemExit):
        parse(["bench", "--compile-backends", "fused,loopy"])
    assert "unknown backend 'loopy'" in capsys.readouterr().err


def test_compile_backends_limits_the_compiled_vensemble_candidates():
    w = main_workloads(quick=True)["small100"]
    models, x = w.members(), w.make_input()
    opts = Options(compile=True, peers=False, compile_backends=("fused",))
    names = {c.name: c for c in build_candidates(w, models, x, opts)}
    fused = names["vensemble fused +compile"]
    assert fused.compiled or fused.note.startswith("not built: ")
    for backend in BACKENDS:
        assert names[f"vensemble {backend}"].fn is not None  # eager: always
        if backend != "fused":
            skipped = names[f"vensemble {backend} +compile"]
            assert skipped.fn is None
            assert skipped.note == "compile not requested (--compile-backends fused)"
    assert names["torch.compile(torch.func)"].compiled  # the baseline is kept


def test_the_report_is_written_after_each_workload_and_survives_a_kill(tmp_path, monkeypatch):
    out_json, out_md = tmp_path / "bench.json", tmp_path / "bench.md"
    seen: list[tuple[str, list[str] | None]] = []
    steady = bench._steady

    def record_then_maybe_die(w, opts, run, best_peak, retries):
        before = json.loads(out_json.read_text()) if out_json.exists() else None
        seen.append((w.key, None if before is None else [x["key"] for x in before["workloads"]]))
        if w.key == "small100":
            raise KeyboardInterrupt  # as if the stage's timeout killed the run here
        return steady(w, opts, run, best_peak, retries)

    monkeypatch.setattr(bench, "_steady", record_then_maybe_die)
    args = [*QUICK, "--json", str(out_json), "--markdown", str(out_md)]
    with pytest.raises(KeyboardInterrupt):  # the order of --workload is the run's order
        main([*args, "--workload", "tiny1000", "--workload", "tutorial2", "--workload", "small100"])
    assert seen == [
        ("tiny1000", None),
        ("tutorial2", ["tiny1000"]),
        ("small100", ["tiny1000", "tutorial2"]),
    ]
    report = json.loads(out_json.read_text())
    assert report["complete"] is False and report["command"].endswith("--no-peers")
    assert [w["key"] for w in report["workloads"]] == ["tiny1000", "tutorial2"]
    assert all(r["status"] != "WRONG" for w in report["workloads"] for r in w["rows"])
    assert any(t["target"].startswith("3 ") for t in report["targets"])
    markdown = out_md.read_text()
    assert "**Partial report**: written after 2 workload(s)" in markdown
    assert "### 8 x MLP 8-32-32-1" in markdown and "### tutorial:" in markdown
    assert not list(tmp_path.glob(".*.tmp"))  # written through a temporary file, renamed

    monkeypatch.setattr(bench, "_steady", steady)
    assert main([*args, "--workload", "small100"]) == 0
    report = json.loads(out_json.read_text())
    assert report["complete"] is True and [w["key"] for w in report["workloads"]] == ["small100"]
    assert "Partial report" not in out_md.read_text()


def test_memory_cases_are_written_one_by_one(tmp_path, monkeypatch):
    out_json = tmp_path / "bench.json"
    measured: list[MemoryCase] = []

    def fake_run(cases, device, threads):  # no subprocesses: a made-up growth per case
        (case,) = cases
        if len(measured) == 2:
            raise KeyboardInterrupt  # killed while the third case runs
        measured.append(case)
        return [MemoryCase(**{**vars(case), "peak_growth_mb": 1.0 + len(measured)})]

    monkeypatch.setattr(bench, "run_memory_cases", fake_run)
    with pytest.raises(KeyboardInterrupt):
        main([*QUICK, "--workload", "memory", "--json", str(out_json)])
    report = json.loads(out_json.read_text())
    assert report["complete"] is False and report["workloads"] == []
    assert [(m["runner"], m["n"], m["chunk_size"]) for m in report["memory"]] == [
        (c.runner, c.n, c.chunk_size) for c in measured
    ]
    assert [m["peak_growth_mb"] for m in report["memory"]] == [2.0, 3.0]


def test_interleaved_rounds_rotate_the_order_of_the_candidates():
    from vensemble._timing import interleaved_samples

    calls: list[str] = []
    fns = {name: (lambda n=name: calls.append(n)) for name in "abc"}
    samples = interleaved_samples(fns, rounds=3, round_time=1e-4)
    assert [len(v) for v in samples.values()] == [3, 3, 3]
    runs = [n for k, n in enumerate(calls) if k == 0 or calls[k - 1] != n]  # one per timing
    assert runs[-9:] == list("abcbcacab")  # each round starts one candidate later


def test_interleaved_rounds_of_no_candidates_are_empty():
    from vensemble._timing import interleaved_samples

    assert interleaved_samples({}, rounds=3, round_time=1e-4) == {}  # (nothing ran correctly)


def test_the_report_says_how_vensemble_ran_and_which_layers_went_by_columns():
    from vensemble._bench_report import _how_it_ran

    detail = {
        "(auto)": "vectorized (measured per call: vectorized 1 ms, loop 2 ms); the vectorized path:",
        "0": "fused: baddbmm over the members' in-major weights",
        "2": "fused: baddbmm ...; y^T = W x^T for 64 rows (narrow, measured)",
        "1": "fused: the layer itself",
    }
    rows = [
        {"candidate": "vensemble auto", "detail": detail},
        {"candidate": "loop", "detail": None},
    ]
    (line,) = _how_it_ran(rows)
    assert line == (
        "- vensemble auto: (auto) vectorized (measured per call: vectorized 1 ms, loop 2 ms); "
        "y^T = W x^T in 2"
    )

"""The command line: `vensemble demo` and `python -m vensemble`."""

from __future__ import annotations

import subprocess
import sys

import pytest

from vensemble.cli import main


def test_demo_prints_both_options_checked_against_the_loop(capsys):
    assert main(["demo", "--members", "3", "--batch", "8", "--rounds", "1", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "3 x MLP 784-128-128-10, batch 8, cpu" in out
    assert "1: a minibatch per model" in out and "2: one minibatch for all" in out
    assert "both options match the loop" in out


def test_python_dash_m_runs_the_cli():
    done = subprocess.run(
        [sys.executable, "-m", "vensemble", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert "demo" in done.stdout


def test_demo_refuses_zero_rounds(capsys):
    # it crashed on the median of no timings
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--rounds", "0"])
    assert exit_info.value.code == 2
    assert "argument --rounds: expected a positive int, got 0" in capsys.readouterr().err

"""The command line: `vensemble demo` and `python -m vensemble`."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

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


@pytest.mark.parametrize("verb", ["demo", "bench", "train"])
def test_a_device_that_is_not_there_is_a_usage_error_naming_the_flag(capsys, verb):
    # it was a traceback from torch.device, or from the first tensor moved to the device
    with pytest.raises(SystemExit) as exit_info:
        main([verb, "--device", "bogus"])
    assert exit_info.value.code == 2
    assert "argument --device: not a device: 'bogus'" in capsys.readouterr().err
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit) as exit_info:
            main([verb, "--device", "cuda:1"])
        assert exit_info.value.code == 2
        assert "'cuda:1': this machine has no CUDA device" in capsys.readouterr().err


def test_device_name_checks_the_cuda_index(monkeypatch):
    import argparse

    from vensemble.cli import device_name

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert device_name("cuda:1") == "cuda:1"
    assert device_name("cpu") == "cpu"
    with pytest.raises(argparse.ArgumentTypeError, match="2 CUDA device"):
        device_name("cuda:2")

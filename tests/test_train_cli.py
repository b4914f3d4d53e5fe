"""`vensemble train`: trains, evaluates and saves, on digits and on tensors from a file."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import vensemble as ve
from vensemble._train_cli import make_mlp
from vensemble.cli import main

TINY = ["--members", "3", "--epochs", "2", "--hidden", "16", "--quiet", "--device", "cpu"]


def test_train_on_digits_writes_the_ensemble_plots_and_report(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *TINY, "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "3 x MLP 64-16-16-10 on digits" in text
    for row in ("member 0", "member 2", "ensemble", "best member (member", "mean member"):
        assert row in text
    assert "rotated digits" in text and "uniform noise" in text
    for name in ("ensemble.safetensors", "learning_curves.png", "reliability.png"):
        assert (out / name).stat().st_size > 0
    with (out / "learning_curves.png").open("rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    # the saved file loads with vensemble.load and the member's architecture
    ens = ve.load(out / "ensemble.safetensors", lambda: make_mlp(64, 16, 10))
    assert len(ens) == 3 and ens.state_dict()["0.weight"].shape == (3, 16, 64)
    # the ensemble row's accuracy is the mean-probability ensemble's: a number in [0, 1]
    row = next(line for line in text.splitlines() if line.startswith("ensemble"))
    acc, nll, ece = (float(v) for v in row.split()[1:])
    assert 0 <= acc <= 1 and nll > 0 and 0 <= ece <= 1


@pytest.mark.parametrize("suffix", [".npz", ".pt"])
def test_train_on_tensors_from_a_file(tmp_path, capsys, suffix):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(120, 5, 5, generator=g)  # images: the rotated set is made too
    y = (x.mean(dim=(1, 2)) > 0.5).long() + (x[:, 0, 0] > 0.5).long()
    path = tmp_path / f"data{suffix}"
    if suffix == ".npz":
        np.savez(path, X=x.numpy(), y=y.numpy())
    else:
        torch.save({"X": x, "y": y}, path)
    assert main(["train", *TINY, "--data", str(path), "--out", str(tmp_path / "o")]) == 0
    text = capsys.readouterr().out
    assert "3 x MLP 25-16-16-3 on data" in text and "rotated" in text
    assert (tmp_path / "o" / "ensemble.safetensors").exists()


def test_train_rejects_a_bad_file_in_one_line(tmp_path, capsys):
    # a user's mistake is a one-line message and exit status 2, not a traceback
    path = tmp_path / "bad.npz"
    np.savez(path, features=np.zeros((4, 2)))
    assert main(["train", *TINY, "--data", str(path), "--out", str(tmp_path / "o")]) == 2
    assert "vensemble train: error: " in capsys.readouterr().err
    missing = str(tmp_path / "missing.pt")
    assert main(["train", *TINY, "--data", missing, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vensemble train: error: --data: no file") and err.count("\n") == 1


@pytest.mark.parametrize(
    "flags",
    [["--epochs", "0"], ["--members", "0"], ["--batch-size", "0"], ["--patience", "0"]],
)
def test_train_refuses_sizes_below_one_before_training(tmp_path, flags, capsys):
    # --epochs 0 trained nothing, then crashed drawing an empty log-scaled plot
    with pytest.raises(SystemExit) as exit_info:
        main(["train", *TINY, *flags, "--out", str(tmp_path / "o")])
    assert exit_info.value.code == 2
    assert f"argument {flags[0]}: expected a positive int, got 0" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()

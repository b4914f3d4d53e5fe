"""auto's ``"native"`` path: one compiled kernel for chains of Linear layers, against the loop."""

from __future__ import annotations

import copy
import fractions
import itertools
import os
import pickle
import platform
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import vensemble as ve
from _helpers import fake_measurement
from vensemble.backends import native
from vensemble.backends._call import Call
from vensemble.backends.native import Unnative, kernel_library, native_forward

N = 5

pytestmark = pytest.mark.skipif(
    isinstance(kernel_library(), str), reason=f"no compiled kernel here: {kernel_library()}"
)


def _cpu_vector_bytes() -> int | None:
    """The vector width ``-march=native`` gives this CPU, read from Linux's /proc/cpuinfo
    (x86: AVX-512 64 bytes, AVX 32, else 16; other CPUs 16), or None without that file."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((ln.split() for ln in f if ln.startswith("flags")), [])
    except OSError:
        return None
    if platform.machine() != "x86_64":
        return 16
    return 64 if "avx512f" in flags else 32 if "avx" in flags else 16


def _tile_rows(dtype: torch.dtype) -> int:
    """Rows per tile of the kernel this process built: two of its vectors."""
    lib = kernel_library()
    return (
        lib.vensemble_tile_rows_f32() if dtype == torch.float32 else lib.vensemble_tile_rows_f64()
    )


@pytest.mark.skipif(_cpu_vector_bytes() is None, reason="no /proc/cpuinfo to read the CPU from")
def test_the_kernel_vectors_are_as_wide_as_the_cpu_registers():
    # (a 64-byte vector on an AVX2 CPU ran 1000 x MLP 8-32-32-1 at 105 ms against 4.6 ms)
    vector = _cpu_vector_bytes()
    assert vector is not None
    assert _tile_rows(torch.float32) == 2 * vector // 4
    assert _tile_rows(torch.float64) == 2 * vector // 8


def test_explain_names_the_kernel_without_the_library_at_hand(measured, monkeypatch):
    ens, loop = _pair(CHAINS["relu"])
    x = torch.randn(40, 7, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(ens(x), loop(x))
    assert f"tiles of {_tile_rows(torch.float64)} rows" in ens.explain()["(auto)"]
    monkeypatch.setattr(native, "kernel_library", lambda: "no C compiler (cc not found)")
    assert "one compiled kernel runs each member's whole chain" in ens.explain()["(auto)"]


@pytest.fixture
def measured(monkeypatch) -> list[list[str]]:
    """auto measuring "native" fastest where it runs (then the blocks, then the vectorized
    path); returns the paths each measurement was offered."""
    times = {"native": 0.1, "blocked": 0.3, "vectorized": 0.5}
    return fake_measurement(monkeypatch, times, "native", Unnative)


def _pair(factory, n: int = N, dtype=torch.float64) -> tuple[ve.Ensemble, ve.Ensemble]:
    torch.manual_seed(0)
    ens = ve.Ensemble.from_factory(factory, n).to(dtype).eval()
    loop = ve.Ensemble.from_factory(factory, n, backend="loop").to(dtype).eval()
    loop.load_state_dict(ens.state_dict())
    return ens, loop


class _Functional(nn.Module):
    """A hand-written forward: functions, a method and a module, odd widths."""

    def __init__(self, bias: bool = True) -> None:
        super().__init__()
        self.a = nn.Linear(7, 13)
        self.b = nn.Linear(13, 11, bias=bias)
        self.c = nn.Linear(11, 9)
        self.d = nn.Linear(9, 4)
        self.e = nn.Linear(4, 3)
        self.act = nn.LeakyReLU(0.3)

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.a(x))
        h = F.leaky_relu(self.b(h), 0.2)
        h = self.c(h).relu()
        h = self.act(self.d(h))
        return F.hardtanh(self.e(h), -0.5, 0.25)


CHAINS = {
    "relu": lambda: nn.Sequential(
        nn.Linear(7, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 1)
    ),
    "functional": _Functional,
    "no_bias": lambda: _Functional(bias=False),
    "clamps": lambda: nn.Sequential(
        nn.Linear(7, 16),
        nn.ReLU6(),
        nn.Linear(16, 15),
        nn.Hardtanh(-0.1, 0.2),
        nn.Identity(),
        nn.Dropout(0.5),
        nn.Linear(15, 6),
        nn.ReLU(inplace=True),
    ),
    "one_layer": lambda: nn.Linear(7, 5),
    "leaky": lambda: nn.Sequential(nn.Linear(7, 40), nn.LeakyReLU(), nn.Linear(40, 2), nn.Tanh()),
}


@pytest.mark.parametrize("name", sorted(set(CHAINS) - {"leaky"}))
@pytest.mark.parametrize("shape", [(1,), (5,), (33,), (70,), (2, 3), (0,), ()])
def test_chains_match_the_loop(measured, name, shape):
    ens, loop = _pair(CHAINS[name])
    x = torch.randn(*shape, 7, dtype=torch.float64)
    xs = torch.randn(N, *shape, 7, dtype=torch.float64)
    with torch.no_grad():
        for args, in_dims in (((x,), None), ((xs,), 0)):
            for _ in range(2):  # measured, then the remembered choice (the fast path)
                got = ens(*args, in_dims=in_dims)
                torch.testing.assert_close(got, loop(*args, in_dims=in_dims), atol=1e-12, rtol=0)
                assert got.is_contiguous()
            assert ens.explain()["(auto)"].startswith("native"), name
    assert all("native" in paths for paths in measured)


def test_float32_matches_the_loop_and_the_explanation_names_the_chain(measured):
    ens, loop = _pair(CHAINS["relu"], n=37, dtype=torch.float32)
    x = torch.randn(100, 7)
    with torch.no_grad():
        torch.testing.assert_close(ens(x), loop(x))
    why = ens.explain()["(auto)"]
    assert "Linear 7->32, relu, Linear 32->32, relu, Linear 32->1" in why, why


def test_a_tanh_is_not_in_the_kernel(measured):
    ens, loop = _pair(CHAINS["leaky"])
    x = torch.randn(4, 7, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(ens(x), loop(x))
        assert not ens.explain()["(auto)"].startswith("native")
        call = Call(ens._template, N, (x,), {}, (None,))
        with pytest.raises(Unnative, match=r"'tanh_?' is not in the kernel"):
            native_forward(call, ens._native, ens._fused)


class _Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.a(x)


class _TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        return self.a(x) * y


class _Scaled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)

    def forward(self, x: Tensor) -> Tensor:
        return self.a(x) * 2


@pytest.mark.parametrize(
    ("factory", "args", "why"),
    [
        (_Residual, 1, "is read twice"),
        (_TwoInputs, 2, "one tensor input"),
        (_Scaled, 1, "'mul' is not in the kernel"),
        (lambda: nn.Sequential(nn.ReLU(), nn.Linear(4, 4)), 1, "before the first Linear"),
        (lambda: nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4)), 1, "'LayerNorm' is not in"),
        (lambda: nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.LeakyReLU()), 1, "two activations"),
    ],
)
def test_what_is_not_a_chain_runs_the_vectorized_path(measured, factory, args, why):
    ens, loop = _pair(factory)
    inputs = [torch.randn(3, 4, dtype=torch.float64) for _ in range(args)]
    with torch.no_grad():
        torch.testing.assert_close(ens(*inputs), loop(*inputs))
        assert not ens.explain()["(auto)"].startswith("native")
        call = Call(ens._template, N, tuple(inputs), {}, (None,) * args)
        with pytest.raises(Unnative, match=why):
            native_forward(call, ens._native, ens._fused)


def test_autograd_and_training_dropout_are_refused(measured):
    ens, loop = _pair(CHAINS["clamps"])
    x = torch.randn(3, 7, dtype=torch.float64)
    call = Call(ens._template, N, (x,), {}, (None,))
    with pytest.raises(Unnative, match="autograd"):
        native_forward(call, ens._native, ens._fused)
    torch.testing.assert_close(ens(x), loop(x))  # with autograd: never offered
    assert all("native" not in paths for paths in measured)
    ens.train()
    with torch.no_grad(), pytest.raises(Unnative, match="Dropout in training mode"):
        native_forward(call, ens._native, ens._fused)


def test_settings_and_weights_are_read_at_each_call(measured):
    ens, loop = _pair(_Functional)
    x = torch.randn(9, 7, dtype=torch.float64)

    def check() -> None:
        with torch.no_grad():
            for _ in range(2):
                torch.testing.assert_close(ens(x), loop(x), atol=1e-12, rtol=0)
                assert ens.explain()["(auto)"].startswith("native")

    check()
    for m in (ens, loop):  # a setting, an in-place update, a new tensor, a bias given
        m.act.negative_slope = 0.7
        with torch.no_grad():
            m.a.weight.add_(0.5)
        m.c.bias.data = m.c.bias.data * 3
        m.b.bias = nn.Parameter(torch.ones(N, 11, dtype=torch.float64))
    check()
    for m in (ens, loop):
        m.b.bias = None
    check()


def test_a_layout_the_kernel_does_not_read_runs_the_vectorized_path(measured):
    ens, loop = _pair(CHAINS["relu"])
    x = torch.randn(6, 7, dtype=torch.float64)
    with torch.no_grad():
        ens(x)
        assert ens.explain()["(auto)"].startswith("native")
        for m in (ens, loop):  # out-major: the member's own layout, not the kernel's
            first = m.get_submodule("0")
            first.weight = nn.Parameter(first.weight.detach().contiguous() + 1)
        assert not ens.get_submodule("0").weight.mT.is_contiguous()
        torch.testing.assert_close(ens(x), loop(x), atol=1e-12, rtol=0)
        assert ens.explain()["(auto)"].startswith("vectorized")


def test_nan_and_inf_go_through_as_in_the_loop(measured):
    ens, loop = _pair(_Functional)
    x = torch.randn(40, 7, dtype=torch.float64)
    x[3, 2], x[7, 0], x[11] = float("nan"), float("inf"), -float("inf")
    for rows in (x, x[2:8], x[11:12]):  # (tiles of rows; a few rows, outputs in the lanes)
        with torch.no_grad():
            got, expected = ens(rows), loop(rows)
        torch.testing.assert_close(got, expected, atol=1e-12, rtol=0, equal_nan=True)
        assert got.isnan().any()


def test_one_thread_and_inference_mode(measured):
    ens, loop = _pair(CHAINS["relu"], n=40)
    x = torch.randn(65, 7, dtype=torch.float64)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        with torch.inference_mode():
            got = ens(x)
    finally:
        torch.set_num_threads(threads)
    with torch.no_grad():
        torch.testing.assert_close(got, loop(x), atol=1e-12, rtol=0)
        torch.testing.assert_close(ens(x), got, atol=0, rtol=0)  # (same sums on two threads)


def test_copies_and_pickles_start_afresh(measured):
    ens, loop = _pair(CHAINS["relu"])
    x = torch.randn(3, 7, dtype=torch.float64)
    with torch.no_grad():
        ens(x)
        for other in (copy.deepcopy(ens), pickle.loads(pickle.dumps(ens))):
            assert other._native.last is None
            torch.testing.assert_close(other(x), loop(x), atol=1e-12, rtol=0)
            assert other.explain()["(auto)"].startswith("native")


def test_compile_option_runs_the_kernel_eagerly(measured):
    torch.manual_seed(0)
    ens = ve.Ensemble.from_factory(CHAINS["relu"], N, compile=True).eval()
    loop = ve.Ensemble.from_factory(CHAINS["relu"], N, backend="loop").eval()
    loop.load_state_dict(ens.state_dict())
    x = torch.randn(3, 7)
    with torch.no_grad():
        torch.testing.assert_close(ens(x), loop(x))
    assert "the native kernel runs eagerly" in ens.explain()["(compile)"]


def test_the_library_says_why_it_is_missing(monkeypatch, tmp_path):
    monkeypatch.setenv("VENSEMBLE_CACHE_DIR", str(tmp_path))
    try:
        kernel_library.cache_clear()
        monkeypatch.setenv("VENSEMBLE_NATIVE", "0")
        assert kernel_library() == "turned off (VENSEMBLE_NATIVE=0)"
        kernel_library.cache_clear()
        monkeypatch.setenv("VENSEMBLE_NATIVE", "1")
        monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
        assert "no C compiler" in kernel_library()
        kernel_library.cache_clear()
        monkeypatch.delenv("CC")
        assert not isinstance(kernel_library(), str)  # built into the cache directory
        assert [p.suffix for p in (tmp_path / "kernels").iterdir()] == [".so"]
    finally:
        monkeypatch.undo()
        kernel_library.cache_clear()
    ens, loop = _pair(CHAINS["relu"])
    x = torch.randn(3, 7, dtype=torch.float64)
    monkeypatch.setattr(native, "kernel_library", lambda: "no C compiler (cc not found)")
    with torch.no_grad():
        torch.testing.assert_close(ens(x), loop(x))
    assert not ens.explain()["(auto)"].startswith("native")


_ACTIVATIONS = st.sampled_from(
    [None, nn.ReLU, lambda: nn.LeakyReLU(0.05), lambda: nn.Hardtanh(-0.3, 0.4), nn.ReLU6]
)


@settings(max_examples=25, deadline=None)
@given(
    widths=st.lists(st.integers(1, 40), min_size=2, max_size=5),
    acts=st.lists(_ACTIVATIONS, min_size=4, max_size=4),
    rows=st.integers(0, 70),
    n=st.integers(1, 6),
    batched=st.booleans(),
)
def test_random_chains_match_the_loop(widths, acts, rows, n, batched):
    def factory() -> nn.Module:
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(itertools.pairwise(widths)):
            layers.append(nn.Linear(a, b))
            if acts[i] is not None:
                layers.append(acts[i]())
        return nn.Sequential(*layers)

    ens, loop = _pair(factory, n=n)
    x = torch.randn(*((n,) if batched else ()), rows, widths[0], dtype=torch.float64)
    call = Call(ens._template, n, (x,), {}, (0 if batched else None,))
    with torch.no_grad():
        got, run = native_forward(call, ens._native, ens._fused)
        expected = loop(x, in_dims=0 if batched else None)
        torch.testing.assert_close(got, expected, atol=1e-12, rtol=0)
        torch.testing.assert_close(run(x), expected, atol=1e-12, rtol=0)


def test_traces_transforms_and_autocast_see_torch_ops(measured):
    from torch.fx.experimental.proxy_tensor import make_fx

    ens, loop = _pair(CHAINS["relu"], dtype=torch.float32)
    x, x2 = torch.randn(6, 7), torch.randn(6, 7)
    with torch.no_grad():
        ens(x)
        assert ens.explain()["(auto)"].startswith("native")  # the choice the calls below keep
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # (jit.trace is, in torch 2.13)
            warnings.simplefilter("ignore", torch.jit.TracerWarning)  # (shape checks, as usual)
            traced = torch.jit.trace(ens, (x,), check_trace=False)
        torch.testing.assert_close(traced(x2), loop(x2))
        graph = make_fx(ens)(x)
        torch.testing.assert_close(graph(x2), loop(x2))
        xs = torch.randn(3, 6, 7)
        torch.testing.assert_close(torch.func.vmap(ens)(xs), torch.stack([loop(t) for t in xs]))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got, expected = ens(x2), loop(x2)
        assert got.dtype == expected.dtype == torch.bfloat16
        torch.testing.assert_close(got, expected, atol=0.05, rtol=0.05)
        torch.testing.assert_close(ens(x2), loop(x2))  # and the kernel again after
        assert ens.explain()["(auto)"].startswith("native")


def test_tensors_without_their_memory_are_refused(measured):
    ens, loop = _pair(CHAINS["relu"])
    x = torch.randn(6, 7, dtype=torch.float64)
    with torch.no_grad():
        ens(x)
        assert ens.explain()["(auto)"].startswith("native")
        call = Call(ens._template, N, (x,), {}, (None,))
        gone = torch.randn(6, 7, dtype=torch.float64)
        gone.untyped_storage().resize_(0)  # (torch raises for it; the kernel would read 0)
        with pytest.raises(Unnative, match="no memory"):
            native_forward(Call(ens._template, N, (gone,), {}, (None,)), ens._native, ens._fused)
        with pytest.raises(RuntimeError):
            ens(gone)
        bias = ens.get_submodule("0").bias
        kept = bias.detach().clone()
        bias.untyped_storage().resize_(8)  # (the kernel would read past it)
        with pytest.raises(Unnative, match="no memory"):
            native_forward(call, ens._native, ens._fused)
        bias.untyped_storage().resize_(kept.numel() * 8)
        bias.copy_(kept)
        torch.testing.assert_close(ens(x), loop(x), atol=1e-12, rtol=0)


def test_a_negated_view_is_read_with_its_sign(measured):
    ens, loop = _pair(lambda: nn.Sequential(nn.Linear(1, 4), nn.ReLU(), nn.Linear(4, 2)))
    x = torch.tensor([[0.5 + 2.0j]], dtype=torch.complex128).conj().imag  # -2.0, lazily
    assert x.is_neg() and x.is_contiguous()
    with torch.no_grad():
        for _ in range(2):
            torch.testing.assert_close(ens(x), loop(x), atol=1e-12, rtol=0)


def test_leaky_relu_at_zero_and_settings_out_of_range_as_torch(measured):
    def zeros(slope: float):
        def factory() -> nn.Module:
            first = nn.Linear(7, 3)
            nn.init.zeros_(first.weight)
            nn.init.zeros_(first.bias)
            return nn.Sequential(first, nn.LeakyReLU(slope), nn.Linear(3, 2))

        return factory

    x = torch.randn(4, 7, dtype=torch.float64)
    with torch.no_grad():
        ens, loop = _pair(zeros(float("inf")))  # 0 * inf: NaN, in torch
        got = ens(x)
        assert ens.explain()["(auto)"].startswith("native") and got.isnan().all()
        torch.testing.assert_close(got, loop(x), equal_nan=True)
        ens, loop = _pair(
            lambda: nn.Sequential(nn.Linear(7, 3), nn.Hardtanh(-1e300, 1e300)), dtype=torch.float32
        )
        with pytest.raises(RuntimeError, match="overflow"):
            loop(x.float())
        with pytest.raises(RuntimeError, match="overflow"):  # (the kernel refuses; torch raises)
            ens(x.float())


def test_a_fallback_is_measured_again_and_explain_describes_what_ran(measured):
    ens, loop = _pair(
        lambda: nn.Sequential(nn.Linear(7, 5), nn.LeakyReLU(0.2), nn.Dropout(), nn.Linear(5, 2))
    )
    x = torch.randn(4, 7, dtype=torch.float64)
    with torch.no_grad():
        ens(x)
        assert "Linear 7->5, leaky_relu(0.2), Linear 5->2" in ens.explain()["(auto)"]
        assert f"tiles of {_tile_rows(torch.float64)} rows" in ens.explain()["(auto)"]
        for m in (ens, loop):
            m.get_submodule("1").negative_slope = torch.tensor(0.3)  # not a number: refused
        torch.testing.assert_close(ens(x), loop(x), atol=1e-12, rtol=0)
        assert ens.explain()["(auto)"].startswith("vectorized")
        for m in (ens, loop):
            m.get_submodule("1").negative_slope = 0.3
        torch.testing.assert_close(ens(x), loop(x), atol=1e-12, rtol=0)
        assert ens.explain()["(auto)"].startswith("native")  # measured again
        ens.train()  # explain() describes the last call's chain, whatever changed since
        assert "leaky_relu(0.3)" in ens.explain()["(auto)"]


def test_too_wide_a_layer_is_refused(measured, monkeypatch):
    monkeypatch.setattr(native, "MAX_WIDTH", 16)
    ens, loop = _pair(CHAINS["relu"])  # 32 wide
    x = torch.randn(4, 7, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(ens(x), loop(x), atol=1e-12, rtol=0)
        assert not ens.explain()["(auto)"].startswith("native")
        with pytest.raises(Unnative, match="wider than 16"):
            native_forward(Call(ens._template, N, (x,), {}, (None,)), ens._native, ens._fused)


def test_the_library_never_raises(monkeypatch):
    def broken() -> None:
        raise RuntimeError("Could not determine home directory")

    monkeypatch.setattr(native, "_cache_dir", broken)
    kernel_library.cache_clear()
    try:
        assert "Could not determine home directory" in kernel_library()
    finally:
        monkeypatch.undo()
        kernel_library.cache_clear()


def test_parameters_of_another_layout_for_one_call_keep_the_choice(measured):
    ens, loop = _pair(CHAINS["relu"])
    x = torch.randn(6, 7, dtype=torch.float64)
    other = {k: torch.randn(v.shape, dtype=v.dtype) for k, v in ens.state_dict().items()}
    assert not other["0.weight"].mT.is_contiguous()  # (out-major, as torch.randn makes it)
    with torch.no_grad():
        expected = torch.func.functional_call(loop, other, (x,))
        for _ in range(3):
            torch.testing.assert_close(ens(x), loop(x), atol=1e-12, rtol=0)
            assert ens.explain()["(auto)"].startswith("native")
            got = torch.func.functional_call(ens, other, (x,))
            torch.testing.assert_close(got, expected, atol=1e-12, rtol=0)
    assert len(measured) == 1  # (measured again on every other call before)


@pytest.mark.parametrize("slope", [2**70, fractions.Fraction(1, 3)])
def test_settings_torch_refuses_raise_as_in_the_loop(measured, slope):
    ens, loop = _pair(lambda: nn.Sequential(nn.Linear(7, 5), nn.LeakyReLU(), nn.Linear(5, 2)))
    x = torch.randn(3, 7, dtype=torch.float64)
    with torch.no_grad():
        ens(x)
        assert ens.explain()["(auto)"].startswith("native")
        for m in (ens, loop):
            m.get_submodule("1").negative_slope = slope
        with pytest.raises((OverflowError, TypeError)) as raised:
            loop(x)
        with pytest.raises(raised.type):
            ens(x)


def test_a_library_someone_else_may_write_is_not_loaded(monkeypatch, tmp_path):
    monkeypatch.setenv("VENSEMBLE_CACHE_DIR", str(tmp_path))
    try:
        kernel_library.cache_clear()
        assert not isinstance(kernel_library(), str)
        (built,) = (tmp_path / "kernels").iterdir()
        assert built.stat().st_mode & 0o777 == 0o755
        planted = tmp_path / "planted"  # (loading it would fail, or worse)
        planted.write_bytes(b"not a library")
        planted.chmod(0o666)
        os.replace(planted, built)  # (a new file: the loaded library's pages stay intact)
        kernel_library.cache_clear()
        assert not isinstance(kernel_library(), str)  # built afresh elsewhere
        assert built.read_bytes() == b"not a library"
    finally:
        monkeypatch.undo()
        kernel_library.cache_clear()


class _Flattens(nn.Module):
    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.flat = nn.Flatten()
        self.a = nn.Linear(12, 9)
        self.b = nn.Linear(9, 2)

    def forward(self, x: Tensor) -> Tensor:
        if self.how == "method":
            x = x.flatten(1)
        elif self.how == "function":
            x = torch.flatten(x, start_dim=1)
        else:
            x = self.flat(x)
        return self.b(torch.relu(self.a(x)))


@pytest.mark.parametrize("how", ["method", "function", "module"])
def test_an_input_flattened_first_matches_the_loop(measured, how):
    ens, loop = _pair(lambda: _Flattens(how))
    with torch.no_grad():
        for shape in ((5, 3, 4), (1, 12), (0, 2, 6), (2, 2, 3, 2)):
            x = torch.randn(*shape, dtype=torch.float64)
            xs = torch.randn(N, *shape, dtype=torch.float64)
            for args, in_dims in (((x,), None), ((xs,), 0)):
                for _ in range(2):
                    got = ens(*args, in_dims=in_dims)
                    torch.testing.assert_close(
                        got, loop(*args, in_dims=in_dims), atol=1e-12, rtol=0
                    )
                    assert ens.explain()["(auto)"].startswith("native"), (how, shape)
                    assert (
                        "(flatten(1), Linear 12->9, relu, Linear 9->2)" in ens.explain()["(auto)"]
                    )
        flat = torch.randn(12, dtype=torch.float64)  # (flatten(1) of one dim: torch raises)
        with pytest.raises(IndexError):
            loop(flat)
        with pytest.raises(IndexError):
            ens(flat)


def test_other_flattens_are_not_in_the_kernel(measured):
    class Partial(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(4, 2)

        def forward(self, x: Tensor) -> Tensor:
            return self.a(x.flatten(2))  # (B, 3, 2, 2) -> (B, 3, 4)

    ens, loop = _pair(Partial)
    x = torch.randn(5, 3, 2, 2, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(ens(x), loop(x), atol=1e-12, rtol=0)
        assert not ens.explain()["(auto)"].startswith("native")
    ens, loop = _pair(lambda: _Flattens("module"))
    x = torch.randn(5, 3, 4, dtype=torch.float64)
    with torch.no_grad():
        ens(x)
        assert ens.explain()["(auto)"].startswith("native")
        for m in (ens, loop):  # (the module's dims are read at each call)
            m.flat.start_dim = 2
        with pytest.raises(RuntimeError):  # (12 features expected, 4 given)
            loop(x)
        with pytest.raises(RuntimeError):
            ens(x)


def _wide() -> nn.Module:
    # outputs in blocks of 4 vectors, of 1 vector, and one by one (a batch of a few rows)
    return nn.Sequential(
        nn.Linear(7, 90),
        nn.ReLU(),
        nn.Linear(90, 130),
        nn.LeakyReLU(0.1),
        nn.Linear(130, 17),
        nn.Hardtanh(-0.3, 0.4),
        nn.Linear(17, 1),
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 6, 7, 8, 9])
def test_a_batch_of_a_few_rows_matches_the_loop(measured, rows, dtype):
    # up to 8 rows: outputs in the vector lanes, all rows at once
    ens, loop = _pair(_wide, n=4, dtype=dtype)
    x = torch.randn(rows, 7, dtype=dtype)
    xs = torch.randn(4, rows, 7, dtype=dtype)
    tol = {"atol": 1e-12, "rtol": 0} if dtype == torch.float64 else {}
    with torch.no_grad():
        for _ in range(2):
            torch.testing.assert_close(ens(x), loop(x), **tol)
            torch.testing.assert_close(ens(xs, in_dims=0), loop(xs, in_dims=0), **tol)
        assert ens.explain()["(auto)"].startswith("native")


@pytest.mark.parametrize("rows", [1, 8, 9, 15, 16, 17, 31, 32, 33, 40, 48, 49])
def test_float32_tiles_of_one_vector_and_of_two_match_the_loop(measured, rows):
    # a tile of at most 16 float32 rows runs one vector of rows (half the work); the others two
    ens, loop = _pair(CHAINS["relu"], n=5, dtype=torch.float32)
    x = torch.randn(rows, 7)
    xs = torch.randn(5, rows, 7)
    with torch.no_grad():
        torch.testing.assert_close(ens(x), loop(x))
        torch.testing.assert_close(ens(xs, in_dims=0), loop(xs, in_dims=0))
        assert ens.explain()["(auto)"].startswith("native")


def test_the_kernel_structs_are_built_once_and_again_when_a_parameter_or_setting_changes(
    measured, monkeypatch
):
    built = []
    layers = native._layers
    monkeypatch.setattr(native, "_layers", lambda *a: built.append(1) or layers(*a))
    ens, loop = _pair(_Functional)
    x = torch.randn(9, 7, dtype=torch.float64)

    def check(builds: int) -> None:
        with torch.no_grad():
            for _ in range(3):
                torch.testing.assert_close(ens(x), loop(x), atol=1e-12, rtol=0)
                assert ens.explain()["(auto)"].startswith("native")
        assert len(built) == builds

    check(1)
    with torch.no_grad():
        for m in (ens, loop):  # in place: the same memory, read at each call
            m.a.weight.mul_(2)
    check(1)
    for m in (ens, loop):
        m.act.negative_slope = 0.7
    check(2)
    for m in (ens, loop):  # new memory behind the same parameter
        m.c.bias.data = m.c.bias.data * 3
    check(3)
    for m in (ens, loop):
        m.b.bias = nn.Parameter(torch.ones(N, 11, dtype=torch.float64))
    check(4)


def test_conversions_swapping_parameters_let_go_of_the_kernel_structs(measured):
    # torch.utils.swap_tensors refuses a tensor that a view kept by the structs refers to
    ens, loop = _pair(CHAINS["relu"], dtype=torch.float32)
    x = torch.randn(6, 7)
    swap = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        with torch.no_grad():
            ens(x)
            ens.double()
            loop.double()
            torch.testing.assert_close(ens(x.double()), loop(x.double()), atol=1e-12, rtol=0)
            assert ens.explain()["(auto)"].startswith("native")
    finally:
        torch.__future__.set_swap_module_params_on_conversion(swap)


def test_a_setting_changed_to_minus_zero_is_a_new_setting(measured):
    # the structs' key compared settings with ==, and 0.0 == -0.0: zeros kept the old sign
    def factory() -> nn.Module:
        first = nn.Linear(7, 3)
        nn.init.zeros_(first.weight)
        nn.init.constant_(first.bias, -1.0)
        return nn.Sequential(first, nn.LeakyReLU(0.0))

    ens, loop = _pair(factory)
    x = torch.randn(4, 7, dtype=torch.float64)
    with torch.no_grad():
        for slope in (0.0, -0.0, 0.0):
            for m in (ens, loop):
                m.get_submodule("1").negative_slope = slope
            got, expected = ens(x), loop(x)
            assert ens.explain()["(auto)"].startswith("native")
            assert torch.equal(got, expected) and (got == 0).all()
            assert torch.equal(got.signbit(), expected.signbit()), slope


def test_swapping_a_parameter_after_calls(measured):
    # the structs held a view of the parameter itself, which swap_tensors refuses
    ens, loop = _pair(CHAINS["relu"])
    x = torch.randn(6, 7, dtype=torch.float64)
    with torch.no_grad():
        ens(x)
        for m in (ens, loop):
            w = m.get_submodule("2").weight
            torch.utils.swap_tensors(w, nn.Parameter(w.detach() * 2))
        torch.testing.assert_close(ens(x), loop(x), atol=1e-12, rtol=0)
        assert ens.explain()["(auto)"].startswith("native")


@pytest.mark.parametrize("rows", [1, 9])
@pytest.mark.parametrize("bounds", [(-0.0, 1.0), (-1.0, -0.0)])
def test_a_bound_of_minus_zero_clamps_to_minus_zero(measured, bounds, rows):
    # the vector lanes splatted -0.0 as 0.0 + -0.0, which is +0.0; torch's clamp keeps -0.0
    ens, loop = _pair(lambda: nn.Sequential(nn.Linear(4, 17), nn.Hardtanh(*bounds)))
    x = torch.randn(rows, 4, dtype=torch.float64)
    with torch.no_grad():
        got, expected = ens(x), loop(x)
    assert ens.explain()["(auto)"].startswith("native")
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=0)
    zeros = expected == 0
    assert zeros.any() and torch.equal(got[zeros].signbit(), expected[zeros].signbit())


# float32 lanes per vector of the kernel built here (16 with AVX-512: the sizes below are then
# 23-256-256-1 on 8 rows, 8-15-15-1 on 8, 7 and 1 row, 1000-10, 64-63-63-1, 200-9; with 4 lanes,
# SSE or NEON, every output narrower than VEC_TAIL = 4 goes one at a time: a table of its own)
_L = _tile_rows(torch.float32) // 2 if not isinstance(kernel_library(), str) else 16
_FEW_CASES = (
    [
        ((23, 256, 256, 1), _L // 2, True),
        ((23, 256, 256, 1), 1, True),
        ((8, _L - 1, _L - 1, 1), _L // 2, False),  # layers narrower than a vector: lanes idle
        ((8, _L - 1, _L - 1, 1), _L // 2 - 1, False),
        ((8, _L - 1, _L - 1, 1), 1, True),
        ((1000, _L * 5 // 8), _L // 2, True),
        ((64, 4 * _L - 1, 4 * _L - 1, 1), _L // 2, True),
        ((200, _L // 2 + 1), _L // 2, True),
    ]
    if _L >= 8
    else [
        ((23, 256, 256, 1), 2, True),
        ((23, 256, 256, 1), 1, True),
        ((8, 3, 3, 1), 2, False),  # every output one at a time, the rows a tile's half
        ((1000, 8), 2, True),
        ((64, 15, 15, 1), 3, False),
    ]
)


@pytest.mark.parametrize(("widths", "rows", "few"), _FEW_CASES)
def test_a_few_rows_run_in_the_lanes_only_where_that_does_less_work(measured, widths, rows, few):
    # 1000 x 8-15-15-1 on 8 rows (AVX-512): 1609 us in the lanes (every output a scalar) against
    # 200 on a tile; with the last outputs in one vector, 204 against 117, on 1 row 98 against 119
    def factory() -> nn.Module:
        layers: list[nn.Module] = []
        for a, b in itertools.pairwise(widths):
            layers += [nn.Linear(a, b), nn.ReLU()]
        return nn.Sequential(*layers[:-1])

    ens, loop = _pair(factory, n=2, dtype=torch.float32)
    x = torch.randn(rows, widths[0])
    with torch.no_grad():
        torch.testing.assert_close(ens(x), loop(x))
    why = ens.explain()["(auto)"]
    assert why.startswith("native")
    assert ("outputs in the vector lanes" in why) is few, why
    assert (f"tiles of {_tile_rows(torch.float32)} rows" in why) is not few, why


def test_no_rows_leave_the_explanation_of_the_last_call_that_ran(measured):
    ens, _ = _pair(CHAINS["relu"])
    with torch.no_grad():
        ens(torch.randn(40, 7, dtype=torch.float64))
        why = ens.explain()["(auto)"]
        assert ens(torch.randn(0, 7, dtype=torch.float64)).shape == (N, 0, 1)
    assert ens.explain()["(auto)"] == why

"""auto's ``"blocked"`` path: the fused program run on blocks of members, against the loop."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import Tensor, nn

import vensemble as ve
from _helpers import ZOO, assert_tree_close, fake_measurement, zoo_input
from vensemble import ensemble as ensemble_module
from vensemble.backends import blocked
from vensemble.backends import fused as fused_module
from vensemble.backends._call import Call
from vensemble.backends.blocked import Unblockable, blocked_forward

N = 8  # blocks of 3, 3 and 2 members with the sizes forced below


@pytest.fixture
def measured(monkeypatch) -> list[list[str]]:
    """Blocks of 3 members (whatever the activations), and auto measuring "blocked" fastest,
    then the vectorized path; returns the paths each measurement was offered."""
    monkeypatch.setattr(blocked, "BLOCK_BYTES", 1)
    monkeypatch.setattr(blocked, "MIN_BLOCK", 3)
    monkeypatch.setattr(ensemble_module, "MIN_BLOCK", 3)
    times = {"blocked": 0.1, "vectorized": 0.5}
    return fake_measurement(monkeypatch, times, "blocked", Unblockable)


def _calls(monkeypatch, module, name: str) -> list[tuple[object, ...]]:
    """The arguments of every call of ``module.name`` from now on (the function still runs)."""
    calls: list[tuple[object, ...]] = []
    fn = getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a: calls.append(a) or fn(*a))
    return calls


def _fused_like(ens: ve.Ensemble, factory) -> ve.Ensemble:
    """The fused backend over ``ens``'s members (a shared input written in place: once, where
    the loop writes it once per member)."""
    fused = ve.Ensemble.from_factory(factory, ens.num_members, backend="fused").double().eval()
    fused.load_state_dict(ens.state_dict())
    return fused


def _pair(factory, n: int = N) -> tuple[ve.Ensemble, ve.Ensemble]:
    torch.manual_seed(0)
    ens = ve.Ensemble.from_factory(factory, n).double().eval()
    loop = ve.Ensemble.from_factory(factory, n, backend="loop").double().eval()
    loop.load_state_dict(ens.state_dict())
    return ens, loop


@pytest.mark.parametrize("name", sorted(set(ZOO) - {"lstm", "transformer"}))
def test_every_zoo_member_in_blocks_matches_the_loop(measured, name):
    factory, _ = ZOO[name]
    ens, loop = _pair(factory)
    x = zoo_input(name, 5, torch.float64)
    xs = torch.stack([zoo_input(name, 5, torch.float64) for _ in range(N)])
    with torch.no_grad():
        for args, in_dims in (((x,), None), ((xs,), 0)):
            for _ in range(2):  # measured, then the remembered choice (the fast path)
                assert_tree_close(ens(*args, in_dims=in_dims), loop(*args, in_dims=in_dims), 1e-10)
            assert "3 blocks of 3 or 2 members" in ens.explain()["(auto)"], name
    assert measured and all("blocked" in paths for paths in measured)


@pytest.mark.filterwarnings("ignore:vensemble. vmap cannot run")
@pytest.mark.parametrize(("name", "part"), [("lstm", "'rnn'"), ("transformer", "'Transformer")])
def test_a_submodule_without_a_fused_layer_runs_at_once(measured, name, part):
    ens, loop = _pair(ZOO[name][0])
    x = zoo_input(name, 5, torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(ens(x), loop(x))
    assert not ens.explain()["(auto)"].startswith("blocked")
    assert f"{part}" in next(iter(ens._blocked.sizes.values()))


class _Heads(nn.Module):
    """Two outputs in a dict, a shared keyword tensor, and a constant beside them."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(4, 6)
        self.a = nn.Linear(6, 2)
        self.b = nn.Linear(6, 1)

    def forward(self, x: Tensor, shift: Tensor | None = None) -> tuple[dict[str, Tensor], int]:
        h = torch.tanh(self.body(x))
        if shift is not None:
            h = h + shift
        return {"a": self.a(h), "b": self.b(h).squeeze(-1)}, 7


def test_structured_outputs_and_keyword_inputs_in_blocks(measured):
    ens, loop = _pair(_Heads)
    x, shift = torch.randn(5, 4, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    with torch.no_grad():
        got = ens(x, shift=shift)
        assert_tree_close(got, loop(x, shift=shift), 1e-10)
        assert got[1] == 7 and "blocks of" in ens.explain()["(auto)"]


def _fresh_choice(ens: ve.Ensemble) -> None:
    ens._choices.clear()


def test_members_that_draw_or_update_state_are_not_blocked(measured):
    cases = {
        "dropout": (ZOO["dropout"][0], "draws random numbers"),
        "cnn_bn": (ZOO["cnn_bn"][0], "updates its buffers"),
    }
    for name, (factory, why) in cases.items():
        ens, loop = _pair(factory)
        ens.train()
        call = Call(ens._template, N, (zoo_input(name, 5, torch.float64),), {}, (None,))
        with torch.no_grad(), pytest.raises(Unblockable, match=why):
            blocked_forward(call, ens._blocked, ens._fused)
        if name == "cnn_bn":  # auto then runs the whole ensemble at once: the loop's stats
            loop.train()
            x = zoo_input(name, 5, torch.float64)
            with torch.no_grad():
                torch.testing.assert_close(ens(x), loop(x))
            torch.testing.assert_close(ens.state_dict(), loop.state_dict())


class _WritesInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 2)

    def forward(self, x: Tensor) -> Tensor:
        x.mul_(2)
        return self.fc(x)


def test_a_forward_writing_its_input_runs_at_once_and_writes_it_once(measured):
    ens, loop = _pair(_WritesInput)
    xs = torch.randn(N, 4, 3, dtype=torch.float64)
    with torch.no_grad():
        x1, x2 = xs.clone(), xs.clone()
        torch.testing.assert_close(ens(x1, in_dims=0), loop(x2, in_dims=0))
        torch.testing.assert_close(x1, xs * 2)  # written once, as by the loop
    assert "(auto)" in ens.explain() and not ens.explain()["(auto)"].startswith("blocked")
    assert "writes one of its inputs" in next(iter(ens._blocked.sizes.values()))


def test_autograd_and_small_ensembles_are_not_offered_blocks(measured, monkeypatch):
    ens, loop = _pair(ZOO["mlp"][0])
    x = torch.randn(5, 6, dtype=torch.float64)
    torch.testing.assert_close(ens(x), loop(x))  # with autograd
    assert measured[-1] == ["vectorized", "loop"]
    monkeypatch.undo()  # the real sizes: 8 members never fill two blocks
    small, _ = _pair(ZOO["mlp"][0])
    call = Call(small._template, N, (x,), {}, (None,))
    with torch.no_grad(), pytest.raises(Unblockable, match="fits in 1 block"):
        blocked_forward(call, small._blocked, small._fused)


def test_the_block_size_holds_about_block_bytes_of_the_widest_activation():
    torch.manual_seed(0)
    n, rows, width = 256, 128, 32  # the widest activation: 16 KiB per member, 4 MiB in all
    ens = ve.Ensemble.from_factory(
        lambda: nn.Sequential(nn.Linear(8, width), nn.ReLU(), nn.Linear(width, 1)), n
    )
    call = Call(ens._template, n, (torch.randn(rows, 8),), {}, (None,))
    with torch.no_grad():
        out, run = blocked_forward(call, ens._blocked, ens._fused)
    assert [e - s for s, e in ens._blocked.last.bounds] == [128, 128]
    assert blocked.BLOCK_BYTES // (rows * width * 4) == 128 and run is not None
    loop = ve.Ensemble.from_factory(lambda: nn.Linear(1, 1), 1)  # (unused: the loop below)
    del loop
    with torch.no_grad():
        expected = torch.stack([m(call.args[0]) for m in ens.unstack()])
    torch.testing.assert_close(out, expected)


def test_blocks_follow_the_template_after_updates_and_replacements(measured):
    ens, loop = _pair(ZOO["ln_gelu"][0])
    x = torch.randn(5, 6, dtype=torch.float64)

    def check() -> None:
        with torch.no_grad():
            for _ in range(2):  # the full path, then the fast path
                torch.testing.assert_close(ens(x), loop(x))
        assert ens.explain()["(auto)"].startswith("blocked")

    check()
    with torch.no_grad():  # in place: the views show it
        for e in (ens, loop):
            for p in e.parameters():
                p.mul_(1.5)
    check()
    for e in (ens, loop):  # new storage under the same parameters
        for p in e.parameters():
            p.data = p.data * 0.5 + 0.1
    check()
    state = {k: v * -1.0 for k, v in ens.state_dict().items()}  # new tensors
    ens.load_state_dict(state, assign=True)
    loop.load_state_dict(state)
    check()
    for e in (ens, loop):  # a plain setting of a torch layer, read at each call
        e.get_submodule("1").eps = 0.25
    check()
    for e in (ens, loop):
        e.float()
    x = x.float()
    check()


def test_copies_start_without_blocks_and_run_right(measured):
    ens, loop = _pair(ZOO["mlp"][0])
    x = torch.randn(5, 6, dtype=torch.float64)
    with torch.no_grad():
        ens(x)
        assert ens._blocked.blocks
        for copied in (copy.deepcopy(ens), pickle.loads(pickle.dumps(ens))):
            assert not copied._blocked.blocks
            torch.testing.assert_close(copied(x), loop(x))


def test_compile_and_an_outer_torch_compile_with_blocks_chosen(measured):
    torch.manual_seed(0)
    ens = ve.Ensemble.from_factory(ZOO["mlp"][0], N, compile=True).eval()
    loop = ve.Ensemble.from_factory(ZOO["mlp"][0], N, backend="loop").eval()
    loop.load_state_dict(ens.state_dict())
    x = torch.randn(5, 6)
    with torch.no_grad():
        torch.testing.assert_close(ens(x), loop(x))
        assert ens.explain()["(auto)"].startswith("blocked")
        outer = torch.compile(ens)  # inside a trace the whole ensemble runs at once
        torch.testing.assert_close(outer(x), loop(x))


class _Scale(nn.Module):
    """A plain tensor attribute (not a buffer): a constant of the trace, replaced later."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.ones(4, dtype=torch.float64)

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale


def _scaled() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 4), _Scale())


def test_an_attribute_replaced_by_another_tensor_is_noticed(measured):
    ens, loop = _pair(_scaled)
    x = torch.randn(5, 3, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(ens(x), loop(x))
        for e in (ens, loop):
            e.get_submodule("1").scale = torch.full((4,), 3.0, dtype=torch.float64)
        for _ in range(2):
            torch.testing.assert_close(ens(x), loop(x))
        assert ens.explain()["(auto)"].startswith("blocked")


def test_chunk_size_keeps_the_vectorized_path_in_chunks(measured):
    ens, loop = _pair(ZOO["mlp"][0])
    ens.chunk_size = 4
    x = torch.randn(5, 6, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(ens(x), loop(x))
    assert measured == [["vectorized", "loop"]] and not ens._blocked.sizes
    ens.chunk_size = None
    x = torch.randn(6, 6, dtype=torch.float64)  # (a new shape: measured anew)
    with torch.no_grad():
        ens(x)
        assert ens.explain()["(auto)"].startswith("blocked")
        ens.chunk_size = 4  # set after the blocks were chosen: the chunks run
        torch.testing.assert_close(ens(x), loop(x))
    assert ens.explain()["(auto)"].startswith("vectorized")


def test_a_bias_given_to_a_layer_built_without_one_is_seen(measured):
    def net() -> nn.Module:
        return nn.Sequential(nn.Linear(4, 5, bias=False), nn.Tanh())

    ens, loop = _pair(net)
    x = torch.randn(6, 4, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(ens(x), loop(x))
        bias = torch.randn(N, 5, dtype=torch.float64)
        for e in (ens, loop):
            e.get_submodule("0").bias = nn.Parameter(bias.clone())
        for _ in range(2):
            torch.testing.assert_close(ens(x), loop(x))


class _Counting(nn.Module):
    """Updates buffers in its forward, in eval mode too."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.register_buffer("calls", torch.zeros(()))
        self.register_buffer("ema", torch.zeros(4))

    def forward(self, x: Tensor) -> Tensor:
        self.calls += 1
        self.ema.mul_(0.5).add_(x.mean(0) * 0.5)
        return self.fc(x) + self.ema.sum()


def test_a_forward_updating_buffers_in_eval_mode_runs_at_once_and_updates_them_once(measured):
    def net() -> nn.Module:
        return nn.Sequential(_Counting())

    ens, loop = _pair(net)
    x = torch.randn(6, 4, dtype=torch.float64)
    call = Call(ens._template, N, (x,), {}, (None,))
    with torch.no_grad():
        with pytest.raises(Unblockable, match="updates a parameter or buffer"):
            blocked_forward(call, ens._blocked, ens._fused)
        # the run that found it out left no trace (it may happen within a real call)
        torch.testing.assert_close(ens.state_dict(), loop.state_dict())
        for _ in range(3):
            torch.testing.assert_close(ens(x), loop(x))
            torch.testing.assert_close(ens.state_dict(), loop.state_dict())
            for e in (ens, loop):
                e.cpu()
    assert not ens.explain()["(auto)"].startswith("blocked")


def test_an_input_written_under_inference_mode_is_noticed(measured):
    ens, _ = _pair(_WritesInput)
    fused = _fused_like(ens, _WritesInput)
    x0 = torch.randn(5, 3, dtype=torch.float64)
    with torch.inference_mode():
        x1, x2 = x0.clone(), x0.clone()
        torch.testing.assert_close(ens(x1), fused(x2))
        torch.testing.assert_close(x1, x2)  # written once (the loop: once per member)
    assert ens.explain()["(auto)"].startswith("vectorized")
    assert "writes one of its inputs" in next(iter(ens._blocked.sizes.values()))


class _TorchDropout(nn.Module):
    """Draws through a function the fused path's lists do not name."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 8)

    def forward(self, x: Tensor) -> Tensor:
        return torch.dropout(self.fc(x), 0.5, True)


def test_a_random_draw_by_any_function_keeps_the_members_together(measured):
    torch.manual_seed(0)
    member = _TorchDropout().double()
    ens = ve.Ensemble([copy.deepcopy(member) for _ in range(N)], randomness="same").eval()
    x = torch.randn(6, 4, dtype=torch.float64)
    with torch.no_grad():
        for _ in range(2):
            out = ens(x)
            assert (out != 0).any() and (out == 0).any()
            torch.testing.assert_close(out, out[:1].expand_as(out))  # "same": one mask for all
    assert "draws random numbers" in next(iter(ens._blocked.sizes.values()))


def test_the_block_size_is_found_per_input_shape():
    torch.manual_seed(0)
    n = 64  # 64 KiB per member at 512 rows: blocks of 32; at 1 row it all fits at once
    ens = ve.Ensemble.from_factory(lambda: nn.Sequential(nn.Linear(8, 32), nn.ReLU()), n)
    with torch.no_grad():
        for rows, blocks in ((1, None), (512, [32, 32]), (1, None)):
            call = Call(ens._template, n, (torch.randn(rows, 8),), {}, (None,))
            if blocks is None:
                with pytest.raises(Unblockable, match="fits in 1 block"):
                    blocked_forward(call, ens._blocked, ens._fused)
                continue
            blocked_forward(call, ens._blocked, ens._fused)
            assert [e - s for s, e in ens._blocked.last.bounds] == blocks


@pytest.mark.parametrize("backend", ["auto", "fused"])
def test_load_state_dict_swapping_tensors_after_calls(measured, backend):
    ens, loop = _pair(ZOO["ln_gelu"][0])
    ens.backend = backend
    x = torch.randn(5, 6, dtype=torch.float64)
    swapping = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        with torch.no_grad():
            for _ in range(2):
                ens(x)
            state = {k: v * 2 for k, v in ens.state_dict().items()}
            ens.load_state_dict(state)  # (raised "Expected use_count" from swap_tensors)
            loop.load_state_dict(state)
            torch.testing.assert_close(ens(x), loop(x))
    finally:
        torch.__future__.set_swap_module_params_on_conversion(swapping)


class _Tempered(nn.Module):
    """Uses its parameters directly, not through a layer."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.temperature = nn.Parameter(torch.rand(()) + 0.5)
        self.offset = nn.Parameter(torch.randn(3))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.fc(x) * self.temperature, self.offset


def test_parameters_used_directly_are_each_blocks_rows(measured):
    ens, loop = _pair(_Tempered)
    x = torch.randn(5, 4, dtype=torch.float64)
    with torch.no_grad():
        for _ in range(2):  # (a plain tensor view would be traced as one shared constant)
            assert_tree_close(ens(x), loop(x), 1e-10)
        assert ens.explain()["(auto)"].startswith("blocked")


def test_a_torch_layer_made_in_place_is_sized_again(measured):
    def net() -> nn.Module:
        return nn.Sequential(nn.LeakyReLU(0.5), nn.Linear(4, 2))

    ens, _ = _pair(net)
    fused = ve.Ensemble.from_factory(net, N, backend="fused").double().eval()
    fused.load_state_dict(ens.state_dict())
    x0 = torch.randn(5, 4, dtype=torch.float64) - 1
    with torch.no_grad():
        for _ in range(2):
            ens(x0.clone())
        for e in (ens, fused):
            e.get_submodule("0").inplace = True  # writes the shared input: once, not per block
        for _ in range(2):
            x1, x2 = x0.clone(), x0.clone()
            torch.testing.assert_close(ens(x1), fused(x2))
            torch.testing.assert_close(x1, x2)
    assert "writes one of its inputs" in str(list(ens._blocked.sizes.values()))


def test_mode_changes_and_functional_calls_trace_nothing_again(measured, monkeypatch):
    built = _calls(monkeypatch, fused_module, "build_program")
    ens, loop = _pair(_Heads)
    x, shift = torch.randn(5, 4, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    with torch.no_grad():
        for step in range(6):  # keyword inputs: no fast path, each call checks the blocks
            for e in (ens, loop):
                e.train(step % 2 == 0)
            assert_tree_close(ens(x, shift=shift), loop(x, shift=shift), 1e-10)
            if step == 1:
                traced = len(built)  # the whole ensemble's and each block's, in both modes
        assert len(built) == traced
        for scale in (2.0, 3.0):
            params = {k: v * scale for k, v in ens.named_parameters()}
            got = torch.func.functional_call(ens, params, (x,), {"shift": shift})
            loop_params = {k: v * scale for k, v in loop.named_parameters()}
            expected = torch.func.functional_call(loop, loop_params, (x,), {"shift": shift})
            assert_tree_close(got, expected, 1e-10)
        assert_tree_close(ens(x, shift=shift), loop(x, shift=shift), 1e-10)
        assert len(built) == traced


def test_explain_names_the_blocks_of_the_latest_call(measured):
    ens, _ = _pair(ZOO["mlp"][0])
    with torch.no_grad():
        for rows in (5, 6, 5):  # the last through the fast path
            ens(torch.randn(rows, 6, dtype=torch.float64))
        assert ens._blocked.last is ens._blocked.blocks[3]
        assert "3 blocks of 3 or 2 members" in ens.explain()["(auto)"]


class _Leaky(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.act = nn.LeakyReLU(0.5)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: Tensor, scale: float = 1.0) -> Tensor:
        return self.fc(self.act(x)) * scale


def test_a_setting_changed_reaches_every_call_signature(measured):
    ens, _ = _pair(_Leaky)
    fused = ve.Ensemble.from_factory(_Leaky, N, backend="fused").double().eval()
    fused.load_state_dict(ens.state_dict())
    x0 = torch.randn(5, 4, dtype=torch.float64) - 1
    with torch.no_grad():
        for _ in range(2):  # the plain call through the fast path, the other not
            ens(x0.clone())
            ens(x0.clone(), scale=2.0)
        for e in (ens, fused):
            e.get_submodule("act").inplace = True
        for kwargs in ({"scale": 2.0}, {}, {}):  # the keyword call sees the change first
            x1, x2 = x0.clone(), x0.clone()
            torch.testing.assert_close(ens(x1, **kwargs), fused(x2, **kwargs))
            torch.testing.assert_close(x1, x2)


# (torch's own forward-AD decompositions load through torch.jit.script, which warns)
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_forward_mode_ad_keeps_the_tangents(measured):
    import torch.autograd.forward_ad as fwAD

    ens, loop = _pair(ZOO["mlp"][0])
    x = torch.randn(5, 6, dtype=torch.float64)
    tangents = {k: torch.randn_like(v) for k, v in ens.named_parameters()}
    with torch.no_grad():
        ens(x)
        for _ in range(2):
            with fwAD.dual_level():
                got, expected = (
                    fwAD.unpack_dual(
                        torch.func.functional_call(
                            e,
                            {k: fwAD.make_dual(v, tangents[k]) for k, v in e.named_parameters()},
                            (x,),
                        )
                    )
                    for e in (ens, loop)
                )
                torch.testing.assert_close(got.primal, expected.primal)
                assert got.tangent is not None
                torch.testing.assert_close(got.tangent, expected.tangent)


def test_conversions_and_many_batch_sizes_trace_nothing_again(measured, monkeypatch):
    monkeypatch.setattr(blocked, "BLOCK_BYTES", 4096)
    monkeypatch.setattr(blocked, "MIN_BLOCK", 1)
    monkeypatch.setattr(ensemble_module, "MIN_BLOCK", 1)
    built = _calls(monkeypatch, fused_module, "build_program")
    sized = _calls(monkeypatch, blocked, "_block_size")
    ens, loop = _pair(lambda: nn.Sequential(nn.Linear(4, 64), nn.Tanh()), n=16)
    sizes = []
    with torch.no_grad():
        for cycle in range(2):
            for rows in (1, 2, 4, 8):  # blocks of 8, 4, 2 and 1 members; no fast path
                x = torch.randn(rows, 4, dtype=torch.float64)
                torch.testing.assert_close(ens(x, in_dims=(None,)), loop(x))
                sizes.append(len(ens._blocked.last.bounds))
                for e in (ens, loop):
                    e.to("cpu")  # (a conversion that may swap the tensors)
            if cycle == 0:
                traced = len(built)
    assert sizes == [2, 4, 8, 16] * 2 and len(built) == traced
    assert len(sized) == 4  # each input shape sized once (the whole program run once)


class _Slotted(nn.Module):
    __slots__ = ("scale",)

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(x) * getattr(self, "scale", 1.0)


def test_a_module_with_slots_runs_at_once(measured):
    ens, loop = _pair(_Slotted)
    for e in (ens, loop):
        object.__setattr__(e._template, "scale", 3.0)  # (a copy's __dict__ would not hold it)
    x = torch.randn(5, 4, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(ens(x), loop(x))
    assert "has __slots__" in str(list(ens._blocked.sizes.values()))


def test_an_inference_mode_write_that_leaves_the_sizing_input_unchanged_is_noticed(measured):
    def net() -> nn.Module:
        return nn.Sequential(nn.LeakyReLU(0.1, inplace=True), nn.Linear(4, 2))

    ens, _ = _pair(net)
    fused = _fused_like(ens, net)
    x0 = torch.randn(5, 4, dtype=torch.float64) - 1
    with torch.inference_mode():
        ens(torch.zeros(5, 4, dtype=torch.float64))  # sized on zeros: LeakyReLU keeps them
        x1, x2 = x0.clone(), x0.clone()
        torch.testing.assert_close(ens(x1), fused(x2))
        torch.testing.assert_close(x1, x2)
    assert "writes one of its inputs" in str(list(ens._blocked.sizes.values()))


def test_the_fast_path_keeps_no_input_alive(measured):
    import gc
    import weakref

    ens, _ = _pair(ZOO["mlp"][0])
    x = torch.randn(5, 6, dtype=torch.float64)
    with torch.no_grad():
        ens(x)
        ens(x)
    assert ens.explain()["(auto)"].startswith("blocked") and ens._fast
    seen = weakref.ref(x)
    del x
    gc.collect()
    assert seen() is None


class _MyLeaky(nn.LeakyReLU):
    """A user's subclass of a torch layer: traced through, its settings with it."""


def test_a_setting_of_a_traced_torch_layer_subclass_is_seen(measured):
    def net() -> nn.Module:
        return nn.Sequential(_MyLeaky(0.5), nn.Linear(4, 2))

    ens, loop = _pair(net)
    fused = _fused_like(ens, net)
    x0 = torch.randn(5, 4, dtype=torch.float64) - 1
    ens(x0.clone())  # (with autograd: traced, not blocked)
    fused(x0.clone())
    for e in (ens, loop, fused):
        e.get_submodule("0").negative_slope = 0.25
    with torch.no_grad():
        torch.testing.assert_close(fused(x0.clone()), loop(x0.clone()))  # (was 0.75 off)
        torch.testing.assert_close(ens(x0.clone()), loop(x0.clone()))
        for e in (ens, fused):
            e.get_submodule("0").inplace = True
        for _ in range(2):  # (a shared input written in place: once, as by fused)
            x1, x2 = x0.clone(), x0.clone()
            torch.testing.assert_close(ens(x1), fused(x2))
            torch.testing.assert_close(x1, x2)


def test_a_call_the_blocks_refuse_is_measured_again_next_time(measured):
    """A call chosen for blocks that runs at once instead (a setting changed since) forgets the
    choice, and the next call measures again, as documented: the fallback used to remember
    the vectorized program for the fast path, which the next calls then took for good."""

    def net() -> nn.Module:
        return nn.Sequential(nn.LeakyReLU(0.5), nn.Linear(4, 2))

    ens, loop = _pair(net)
    x = torch.randn(5, 4, dtype=torch.float64)
    with torch.no_grad():
        ens(x)
        assert ens.explain()["(auto)"].startswith("blocked") and len(measured) == 1
        ens.get_submodule("0").inplace = True  # (refused: it would write x once per block)
        torch.testing.assert_close(ens(x.clone()), loop(x.clone()))
        assert ens.explain()["(auto)"].startswith("vectorized")
        ens.get_submodule("0").inplace = False
        torch.testing.assert_close(ens(x), loop(x))
    assert len(measured) == 2
    assert ens.explain()["(auto)"].startswith("blocked")

"""The fast path: a repeated call goes straight to the fused program that ran it, and
anything that decided the path (options, modes, shapes) sends it back through the full path."""

from __future__ import annotations

import copy
import os
import pickle
import signal
import threading
import time
import warnings
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import vensemble as ve
import vensemble.ensemble as ensemble_module


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 3))


@pytest.fixture
def full_path_calls(monkeypatch) -> list[int]:
    """Counts the calls that went through the full path's fused_forward."""
    calls: list[int] = []
    real = ensemble_module.fused_forward

    def counted(call, plan):
        calls.append(1)
        return real(call, plan)

    monkeypatch.setattr(ensemble_module, "fused_forward", counted)
    return calls


def test_a_repeated_call_skips_the_full_path_and_equals_the_loop(full_path_calls):
    ens = ve.Ensemble.from_factory(_mlp, 4, backend="fused").eval()
    loop = ve.Ensemble.from_factory(_mlp, 4, backend="loop").eval()
    x = torch.randn(5, 6)
    for _ in range(3):
        torch.testing.assert_close(ens(x), loop(x), atol=1e-6, rtol=1e-5)
    assert len(full_path_calls) == 1
    ens(torch.randn(7, 6))  # a new shape: the full path once more
    ens(torch.randn(7, 6))
    assert len(full_path_calls) == 2
    assert ens.explain()["0"].startswith("fused")


@pytest.mark.parametrize("in_dims", [0, 1, -2])
def test_per_member_inputs_through_the_fast_path(in_dims: int, full_path_calls):
    ens = ve.Ensemble.from_factory(_mlp, 4, backend="fused").eval()
    loop = ve.Ensemble.from_factory(_mlp, 4, backend="loop").eval()
    xs = torch.randn(4, 5, 6).movedim(0, in_dims)
    for _ in range(2):
        torch.testing.assert_close(
            ens(xs, in_dims=in_dims), loop(xs, in_dims=in_dims), atol=1e-6, rtol=1e-5
        )
    assert len(full_path_calls) == 1


def test_changing_what_decided_the_path_leaves_the_fast_path(full_path_calls):
    ens = ve.Ensemble.from_factory(_mlp, 3, backend="fused")
    x = torch.randn(5, 6)
    torch.manual_seed(1)
    ens(x)
    torch.manual_seed(1)
    masked = ens(x)
    assert len(full_path_calls) == 1
    for m in ens.modules():  # one module's mode, not the ensemble's
        if isinstance(m, nn.Dropout):
            m.eval()
    eval_out = ve.Ensemble.from_factory(_mlp, 3, backend="loop").eval()(x)
    torch.testing.assert_close(ens(x), eval_out, atol=1e-6, rtol=1e-5)
    assert not torch.equal(masked, ens(x))
    assert len(full_path_calls) == 2
    ens.backend = "loop"
    torch.testing.assert_close(ens(x), eval_out, atol=0, rtol=0)  # the loop's own kernels
    assert len(full_path_calls) == 2
    with torch.no_grad():
        ens.backend = "fused"
        ens(x)  # grad mode is part of the key
    assert len(full_path_calls) == 3


def test_gradients_after_no_grad_calls_equal_the_loops():
    ens = ve.Ensemble.from_factory(_mlp, 3, backend="fused").eval()
    loop = ve.Ensemble.from_factory(_mlp, 3, backend="loop").eval()
    x = torch.randn(5, 6)
    with torch.no_grad():
        ens(x), ens(x)
    for _ in range(2):
        ens.zero_grad(), loop.zero_grad()
        ens(x).square().sum().backward()
        loop(x).square().sum().backward()
    for (k, p), q in zip(ens.named_parameters(), loop.parameters()):
        assert p.grad is not None and q.grad is not None
        torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-5, msg=k)


class _NormThenLookup(nn.Module):
    """BatchNorm updates its running stats before the lookup can fail on a bad index."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(4)
        self.emb = nn.Embedding(10, 4)

    def forward(self, x: Tensor, idx: Tensor) -> Tensor:
        return self.bn(x) + self.emb(idx)


def test_a_failing_fast_call_leaves_the_buffers_as_they_were():
    ens = ve.Ensemble.from_factory(_NormThenLookup, 3, backend="fused")
    x, idx = torch.randn(8, 4), torch.randint(0, 10, (8,))
    ens(x, idx)
    ens(x, idx)  # the fast path
    before = {k: v.clone() for k, v in ens.state_dict().items()}
    with pytest.raises(IndexError):
        ens(x, torch.full((8,), 10))  # same shapes, so the fast path runs it first
    for k, v in ens.state_dict().items():
        assert torch.equal(v, before[k]), k
    out = ens(x, idx)  # and it works again afterwards
    assert out.shape == (3, 8, 4)


def test_copies_start_without_remembered_programs():
    ens = ve.Ensemble.from_factory(_mlp, 3, backend="fused").eval()
    x = torch.randn(5, 6)
    ens(x), ens(x)
    assert len(ens._fast) == 1
    for other in (copy.deepcopy(ens), pickle.loads(pickle.dumps(ens))):
        assert len(other._fast) == 0
        torch.testing.assert_close(other(x), ens(x), atol=0, rtol=0)
        with torch.no_grad():
            other.get_parameter("0.bias").add_(1.0)  # its own parameters, not ens's
        assert not torch.equal(other(x), ens(x))


@pytest.mark.parametrize("kind", ["forward", "forward_pre", "full_backward", "global_forward"])
def test_hooks_registered_after_the_first_call_run_as_in_the_members_alone(kind: str):
    ens = ve.Ensemble.from_factory(_mlp, 3, backend="fused").eval()
    loop = ve.Ensemble.from_factory(_mlp, 3, backend="loop").eval()
    x = torch.randn(5, 6, requires_grad=kind == "full_backward")  # (no warning about inputs)
    ens(x), ens(x)  # a program is built and remembered
    seen: list[tuple[int, ...]] = []  # the shapes each hook call saw
    layer = ens.get_submodule("0")
    if kind == "forward":
        handle = layer.register_forward_hook(lambda m, i, o: seen.append(tuple(o.shape)))
    elif kind == "forward_pre":
        handle = layer.register_forward_pre_hook(lambda m, i: seen.append(tuple(i[0].shape)))
    elif kind == "full_backward":
        handle = layer.register_full_backward_hook(
            lambda m, gi, go: seen.append(tuple(go[0].shape))
        )
    else:
        handle = nn.modules.module.register_module_forward_hook(
            lambda m, i, o: seen.append(tuple(o.shape)) if m is layer else None
        )
    try:
        out = ens(x)
        if kind == "full_backward":
            out.sum().backward()
        torch.testing.assert_close(out, loop(x), atol=1e-6, rtol=1e-5)
        want = (5, 6) if kind == "forward_pre" else (5, 16)
        assert seen == [want] * 3, seen  # once per member, with the member's own tensors
        assert "hooks" in ens.explain()[""]
    finally:
        handle.remove()
    seen.clear()
    ens(x), ens(x)  # hooks gone: fused again
    assert not seen and ens.explain()["0"].startswith("fused")


def test_the_fast_path_remembers_a_bounded_number_of_call_shapes():
    ens = ve.Ensemble.from_factory(_mlp, 2, backend="fused").eval()
    loop = ve.Ensemble.from_factory(_mlp, 2, backend="loop").eval()
    limit = ensemble_module._FAST_MAX_ENTRIES
    for batch in range(1, limit + 10):  # a new shape every call
        x = torch.randn(batch, 6)
        torch.testing.assert_close(ens(x), loop(x), atol=1e-6, rtol=1e-5)
        assert len(ens._fast) <= limit


def test_a_hook_on_another_module_leaves_the_fast_path_alone(full_path_calls):
    ens = ve.Ensemble.from_factory(_mlp, 3, backend="fused").eval()
    loop = ve.Ensemble.from_factory(_mlp, 3, backend="loop").eval()
    x = torch.randn(5, 6)
    ens(x), ens(x)
    assert len(full_path_calls) == 1
    seen: list[int] = []
    other = nn.Linear(2, 2)  # not a module of ens
    handle = other.register_forward_hook(lambda m, i, o: seen.append(1))
    try:
        torch.testing.assert_close(ens(x), loop(x), atol=1e-6, rtol=1e-5)
        assert len(full_path_calls) == 1 and not seen  # still the remembered program
        layer = ens.get_submodule("3")  # now one of its own
        inner = layer.register_forward_hook(lambda m, i, o: seen.append(2))
        try:
            torch.testing.assert_close(ens(x), loop(x), atol=1e-6, rtol=1e-5)
            assert seen == [2, 2, 2]  # once per member, as the loop runs it
        finally:
            inner.remove()
    finally:
        handle.remove()
    seen.clear()
    ens(x)
    assert not seen and ens.explain()["3"].startswith("fused")


def test_a_hook_is_seen_on_the_first_call_after_it_lands_in_the_dict():
    """Registration numbers the handle before it stores the hook (another thread may call in
    between): a call must look at the dicts themselves, not only at the handle count."""
    from torch.utils.hooks import RemovableHandle

    ens = ve.Ensemble.from_factory(_mlp, 3, backend="fused").eval()
    x = torch.randn(5, 6)
    plain = ens(x)
    for target in (ens.get_submodule("3"), ens):  # a member's module, the ensemble itself
        handle = RemovableHandle(target._forward_hooks)  # numbered, not stored yet
        torch.testing.assert_close(ens(x), plain, atol=0, rtol=0)  # no hook yet: fast
        target._forward_hooks[handle.id] = _double_output  # ... now stored
        try:
            torch.testing.assert_close(ens(x), plain * 2, atol=1e-6, rtol=1e-6)
        finally:
            handle.remove()
        torch.testing.assert_close(ens(x), plain, atol=0, rtol=0)


class _FrozenBackbone(nn.Module):
    """Reads a child's training flag (a common way to freeze a backbone's mode)."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(6, 8), nn.ReLU())
        self.head = nn.Linear(8, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = self.backbone(x)
        return self.head(h if self.backbone.training else h * 0.5)


def test_any_modules_training_flag_leaves_the_fast_path(full_path_calls):
    torch.manual_seed(0)
    ens = ve.Ensemble.from_factory(_FrozenBackbone, 3, backend="fused")
    x = torch.randn(5, 6)

    def loop_out() -> Tensor:
        return torch.stack([m(x) for m in ens.unstack()])  # members carry the flags too

    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            ens.get_submodule("backbone").train()
            ens(x), ens(x)
            calls = len(full_path_calls)
            torch.testing.assert_close(ens(x), loop_out(), atol=1e-6, rtol=1e-5)
            ens.get_submodule("backbone").eval()  # a Sequential's flag, read by its parent
            torch.testing.assert_close(ens(x), loop_out(), atol=1e-6, rtol=1e-5)
            assert len(full_path_calls) == calls + 1


@pytest.mark.parametrize(
    ("shape", "in_dims"),
    [((5, 6), None), ((4, 5, 6), 0), ((5, 3, 6), None), ((4, 5, 3, 6), 0), ((5, 4, 6), 1)],
)
def test_inference_runs_the_programs_no_autograd_entries_and_equals_the_loop(shape, in_dims):
    ens = ve.Ensemble.from_factory(_mlp, 4, backend="fused").eval()
    loop = ve.Ensemble.from_factory(_mlp, 4, backend="loop").eval()
    loop.load_state_dict(ens.state_dict())
    x = torch.randn(shape)
    with torch.no_grad():
        for _ in range(2):
            torch.testing.assert_close(
                ens(x, in_dims=in_dims), loop(x, in_dims=in_dims), atol=1e-6, rtol=1e-5
            )
        program = ens._fused.last
        assert program.no_grad is not None
        assert "forward_no_grad" in program.no_grad.code
        flat = torch.cat([p.reshape(-1) for p in ens.parameters()])  # (in-major: not views)
        torch.nn.utils.vector_to_parameters(flat * 0.5, ens.parameters())  # swaps .data
        torch.nn.utils.vector_to_parameters(flat * 0.5, loop.parameters())
        torch.testing.assert_close(
            ens(x, in_dims=in_dims), loop(x, in_dims=in_dims), atol=1e-6, rtol=1e-5
        )
    out = ens(x, in_dims=in_dims)  # with autograd: the general program, gradients flow
    out.sum().backward()
    assert all(p.grad is not None for p in ens.parameters())


def _double_output(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> Tensor:
    return output * 2  # a module-level function: picklable with the ensemble


@pytest.mark.parametrize("copy_kind", ["none", "deepcopy", "pickle"])
def test_hooks_on_the_ensemble_itself_run_whenever_they_are_registered(copy_kind: str):
    ens = ve.Ensemble.from_factory(_mlp, 3, backend="fused").eval()
    x = torch.randn(5, 6)
    plain = ens(x)
    ens(x)  # __call__ goes straight to forward now
    handle = ens.register_forward_hook(_double_output)
    if copy_kind == "deepcopy":
        ens = copy.deepcopy(ens)
    elif copy_kind == "pickle":
        ens = pickle.loads(pickle.dumps(ens))
    torch.testing.assert_close(ens(x), plain * 2, atol=0, rtol=0)  # once, on the stacked output
    torch.testing.assert_close(ens(x), plain * 2, atol=0, rtol=0)
    if copy_kind == "none":
        handle.remove()
        torch.testing.assert_close(ens(x), plain, atol=0, rtol=0)
    pre = nn.modules.module.register_module_forward_pre_hook(
        lambda m, args: (args[0] * 0,) if m is ens else None
    )
    try:
        zero = ens(torch.zeros(5, 6))
        torch.testing.assert_close(ens(x), zero, atol=0, rtol=0)  # the global hook ran
    finally:
        pre.remove()


def test_an_ensemble_pickled_without_the_hook_lists_still_runs():
    ens = ve.Ensemble.from_factory(_mlp, 3, backend="fused").eval()
    x = torch.randn(5, 6)
    expected = ens(x)
    state = ens.__getstate__()
    for name in ("_hook_dicts", "_own_hook_dicts"):  # as pickled before these lists existed
        del state[name]
    old = ve.Ensemble.__new__(ve.Ensemble)
    old.__setstate__(state)
    torch.testing.assert_close(old(x), expected, atol=0, rtol=0)
    handle = old.get_submodule("3").register_forward_hook(_double_output)
    try:
        torch.testing.assert_close(old(x), expected * 2, atol=1e-6, rtol=1e-6)
    finally:
        handle.remove()


def test_a_compiled_ensemble_module_goes_through_module_call():
    ens = ve.Ensemble.from_factory(_mlp, 2, backend="fused").eval()
    x = torch.randn(5, 6)
    expected = ens(x)
    ens(x)
    graphs: list[torch.fx.GraphModule] = []

    def record(gm: torch.fx.GraphModule, inputs: list[Tensor]) -> Any:
        graphs.append(gm)
        return gm.forward  # run what dynamo captured, as is

    ens.compile(backend=record)  # nn.Module.compile: __call__ must hand over to dynamo
    torch.testing.assert_close(ens(x), expected, atol=1e-6, rtol=1e-5)
    assert graphs  # dynamo traced the call


def test_torch_compile_under_no_grad_traces_the_general_program(monkeypatch):
    from vensemble.backends import _layers

    traced_no_grad: list[int] = []
    real = _layers._Linear.forward_no_grad

    def watched(self, x):
        if torch.compiler.is_compiling():  # the eager-only entry, seen by dynamo
            traced_no_grad.append(1)
        return real(self, x)

    monkeypatch.setattr(_layers._Linear, "forward_no_grad", watched)
    ens = ve.Ensemble.from_factory(_mlp, 3, backend="fused").eval()
    x = torch.randn(5, 6)
    with torch.no_grad():
        expected = ens(x)
        ens(x)  # the eager no-grad program exists now
        compiled = torch.compile(lambda t: ens(t) * 1.0, backend="eager")
        torch.testing.assert_close(compiled(x), expected, atol=1e-6, rtol=1e-5)
    assert not traced_no_grad


@pytest.mark.parametrize("backend", ["auto", "fused"])
def test_a_first_call_from_inside_torch_compile_traces_the_member_eagerly(backend: str):
    """The member's fx trace patches torch's grad-mode switch while it runs; traced by dynamo
    (a cold ensemble called from a compiled function) it was left patched for good."""
    ens = ve.Ensemble.from_factory(_mlp, 3, backend=backend).eval()
    loop = ve.Ensemble.from_factory(_mlp, 3, backend="loop").eval()
    loop.load_state_dict(ens.state_dict())
    x = torch.randn(5, 6)
    compiled = torch.compile(lambda t: ens(t) * 2, backend="eager")
    with torch.no_grad():
        out = compiled(x)  # the program is built during this call
        torch.testing.assert_close(compiled(x), out, atol=0, rtol=0)
    with torch.enable_grad():  # grad mode switches work afterwards
        torch.testing.assert_close(out, loop(x) * 2, atol=1e-6, rtol=1e-5)
        ens(x).sum().backward()  # and eager training through the ensemble
    assert all(p.grad is not None for p in ens.parameters())


@pytest.mark.parametrize("backend", ["auto", "fused", "loop"])
def test_fullgraph_compile_of_a_warm_ensemble_is_one_graph(backend: str):
    """``torch.compile(fullgraph=True)`` and strict export: no graph break once the call
    signature has run eagerly (its trace and auto's measurement run eagerly). On Python 3.11
    ``functools.cached_property`` takes a lock that dynamo cannot enter: Call has none."""
    ens = ve.Ensemble.from_factory(_mlp, 3, backend=backend).eval()  # (dropout off)
    loop = ve.Ensemble.from_factory(_mlp, 3, backend="loop").eval()
    loop.load_state_dict(ens.state_dict())
    x = torch.randn(5, 6)
    ens(x)  # eager: traces the member and (auto) measures the paths for this signature
    graphs: list[torch.fx.GraphModule] = []

    def record(gm: torch.fx.GraphModule, inputs: list[Tensor]) -> Any:
        graphs.append(gm)
        return gm.forward

    compiled = torch.compile(ens, backend=record, fullgraph=True)
    out = compiled(x)
    torch.testing.assert_close(out, loop(x), atol=1e-6, rtol=1e-5)
    out.sum().backward()  # trains through the compiled graph
    assert len(graphs) == 1 and all(p.grad is not None for p in ens.parameters())
    if backend != "loop":  # (the loop puts each member's views in the template's slots)
        exported = torch.export.export(ens, (x,), strict=True).module()  # no side effect
        torch.testing.assert_close(exported(x), loop(x), atol=1e-6, rtol=1e-5)


def _loop_twin(ens: ve.Ensemble) -> ve.Ensemble:
    loop = ve.Ensemble.from_factory(_mlp, len(ens), backend="loop").train(ens.training)
    loop.load_state_dict(ens.state_dict())
    return loop


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
@pytest.mark.parametrize("backend", ["auto", "fused"])
def test_a_submodule_replaced_after_calls_is_what_runs(backend: str, grad: bool):
    """Model surgery after the programs exist: an activation swapped, then a head replaced by
    stacked modules. The remembered programs ran the old modules."""
    ens = ve.Ensemble.from_factory(_mlp, 3, backend=backend).eval()
    x = torch.randn(5, 6)
    with torch.set_grad_enabled(grad):
        ens(x)
        ens(x)  # the fast path has an entry now
        setattr(ens, "1", nn.Tanh())
        loop = _loop_twin(ens)
        setattr(loop, "1", nn.Tanh())
        torch.testing.assert_close(ens(x), loop(x), atol=1e-6, rtol=1e-5)
        heads = [nn.Linear(16, 2) for _ in range(3)]
        head = nn.Linear(16, 2)
        head.weight = nn.Parameter(torch.stack([h.weight.detach() for h in heads]))
        head.bias = nn.Parameter(torch.stack([h.bias.detach() for h in heads]))
        setattr(ens, "3", head)
        expected = torch.stack([heads[i](torch.tanh(m[0](x))) for i, m in enumerate(loop)])
        torch.testing.assert_close(ens(x), expected, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(ens(x), expected, atol=1e-6, rtol=1e-5)  # remembered again
    assert ens.explain()["3"].startswith("fused")


def test_a_parametrization_registered_after_calls_is_applied():
    from torch.nn.utils import parametrize

    class Halve(nn.Module):
        def forward(self, w: Tensor) -> Tensor:
            return w / 2

    ens = ve.Ensemble.from_factory(_mlp, 3, backend="fused").eval()
    x = torch.randn(5, 6)
    with torch.no_grad():
        ens(x)
        ens(x)
        loop = _loop_twin(ens)
        parametrize.register_parametrization(getattr(ens, "0"), "weight", Halve())
        parametrize.register_parametrization(getattr(loop, "0"), "weight", Halve())
        torch.testing.assert_close(ens(x), loop(x), atol=1e-6, rtol=1e-5)


def test_a_parametrization_of_a_root_tensor_works_on_the_members_and_is_named_on_the_ensemble():
    """Members parametrized at their root stack and run as the loop; registering one on the
    ensemble itself moves the tensor off the members' root, which the next call says."""
    from torch.nn.utils import parametrize

    class Positive(nn.Module):
        def forward(self, w: Tensor) -> Tensor:
            return w.exp()

    torch.manual_seed(0)
    members = [_OptionalScale() for _ in range(3)]
    for m in members:
        parametrize.register_parametrization(m, "scale", Positive())
    ens = ve.Ensemble(copy.deepcopy(members), backend="fused")
    x = torch.randn(5, 3)
    torch.testing.assert_close(ens(x), torch.stack([m(x) for m in members]))
    plain = ve.Ensemble([_OptionalScale() for _ in range(3)], backend="fused")
    plain(x)
    parametrize.register_parametrization(plain, "scale", Positive())
    with pytest.raises(ve.EnsembleError, match=r"parametrization of 'scale' was registered on the ensemble itself.*built again"):  # fmt: skip
        plain(x)
    # members parametrized already: torch puts the property on the class itself (no class of
    # the ensemble's own is made), and it must not stay on every Ensemble
    parametrize.register_parametrization(ens, "shift", Positive(), unsafe=True)
    with pytest.raises(ve.EnsembleError, match=r"parametrization of 'shift'"):
        ens(x)
    assert "shift" not in ve.Ensemble.__dict__


def test_a_submodule_put_in_unstacked_is_named():
    ens = ve.Ensemble.from_factory(_mlp, 3, backend="fused")
    x = torch.randn(5, 6)
    ens(x)
    setattr(ens, "3", nn.Linear(16, 2))  # one member's head, not three stacked
    with pytest.raises(ve.EnsembleError, match=r"'3.weight' has shape \(2, 16\).*member dim \(3\)"):
        ens(x)


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
@pytest.mark.parametrize("backend", ["auto", "fused"])
def test_torch_jit_trace_records_the_fused_program(backend: str, grad: bool):
    """Under torch.jit.trace nothing eager-only runs (cached operand views were recorded as
    constants that require grad: the fused program failed, and the trace then segfaulted) and
    nothing is timed (every timed run would be recorded)."""
    ens = ve.Ensemble.from_factory(_mlp, 3, backend=backend).eval()
    loop = _loop_twin(ens)
    x = torch.randn(5, 6)
    with torch.set_grad_enabled(grad), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # (shape checks, as usual)
        warnings.simplefilter("ignore", DeprecationWarning)  # (jit.trace is, in torch 2.13)
        ens(x)
        ens(x)  # eager: cached views and a fast entry exist
        traced = torch.jit.trace(ens, (x,), check_trace=False)
        other = torch.randn(5, 6)
        torch.testing.assert_close(traced(other), loop(other), atol=1e-6, rtol=1e-5)
    graph = str(traced.graph)
    assert "baddbmm" in graph and graph.count("aten::linear") == 0  # batched, not unrolled


def test_the_module_tree_is_compared_only_after_a_registration(monkeypatch):
    """An eager call compares the module tree only when a module, parameter or buffer was
    registered somewhere since its last look (vensemble._tree): one int compare otherwise."""
    checks: list[int] = []
    real = ve.Ensemble._check_modules
    monkeypatch.setattr(ve.Ensemble, "_check_modules", lambda s, c: checks.append(1) or real(s, c))
    ens = ve.Ensemble.from_factory(_mlp, 3, backend="fused").eval()
    x = torch.randn(5, 6)
    with torch.no_grad():
        ens(x)
        ens(x)
        assert checks == []
        nn.Linear(2, 2)  # someone else's module: one look, nothing changed
        ens(x)
        ens(x)
        assert checks == [1]
        setattr(ens, "1", nn.Tanh())
        loop = _loop_twin(ens)
        setattr(loop, "1", nn.Tanh())
        torch.testing.assert_close(ens(x), loop(x), atol=1e-6, rtol=1e-5)
        assert len(checks) == 3  # ens's look, and the twin's after its own surgery


def test_surgery_under_torch_compile_is_seen():
    """Under torch.compile every call compares the tree, so dynamo guards on it (no guard on
    the process-wide registration count, which would recompile on anyone's module)."""
    ens = ve.Ensemble.from_factory(_mlp, 3, backend="fused").eval()
    x = torch.randn(5, 6)
    ens(x)
    graphs: list[torch.fx.GraphModule] = []

    def record(gm: torch.fx.GraphModule, inputs: list[Tensor]) -> Any:
        graphs.append(gm)
        return gm.forward

    compiled = torch.compile(ens, backend=record)
    with torch.no_grad():
        compiled(x)
        nn.Linear(2, 2)  # someone else's module
        compiled(x)
        assert len(graphs) == 1  # no recompile
        setattr(ens, "1", nn.Tanh())
        loop = _loop_twin(ens)
        setattr(loop, "1", nn.Tanh())
        torch.testing.assert_close(compiled(x), loop(x), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(
    "change",
    [
        "shape",
        "dtype",
        "randomness",
        "chunk_size",
        "training",
        "deterministic",
        "in_dims",
        "kwargs",
    ],
)
def test_the_latest_calls_key_is_checked_field_by_field(change: str, monkeypatch):
    """The fast path first compares a call with the latest one, field by field; any field of
    the key that differs sends the call elsewhere."""
    fast_runs: list[int] = []
    real = ve.Ensemble._run_fast
    monkeypatch.setattr(ve.Ensemble, "_run_fast", lambda s, *a: fast_runs.append(1) or real(s, *a))
    ens = ve.Ensemble.from_factory(_mlp, 3, backend="fused").eval()
    x = torch.randn(5, 6)
    with torch.no_grad():
        ens(x)
        ens(x)
        assert len(fast_runs) == 1 and ens._fast.last is not None
        loop = _loop_twin(ens)
        args: tuple[Any, ...] = (x,)
        kwargs: dict[str, Any] = {}
        if change == "shape":
            args = (x[:4],)
        elif change == "dtype":
            ens.double(), loop.double()
            args = (x.double(),)
        elif change == "randomness":
            ens.randomness = "same"
        elif change == "chunk_size":
            ens.chunk_size = 2
        elif change == "training":
            ens.training = loop.training = True  # the ensemble's own flag only
        elif change == "deterministic":
            monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
        elif change == "in_dims":
            args, kwargs = (x.expand(3, 5, 6),), {"in_dims": 0}
        elif change == "kwargs":
            kwargs = {"input": x}
            args = ()
        expected = loop(*args, **kwargs)
        out = ens(*args, **kwargs)
    assert len(fast_runs) == 1  # the latest entry did not run
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("how", ["delattr", "sequential_del"])
def test_a_submodule_deleted_after_calls_is_seen(how: str):
    """Deleting calls no registration hook: each call compares the child dicts' lengths."""

    def make() -> nn.Module:
        return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3), nn.Tanh())

    ens = ve.Ensemble.from_factory(make, 3, backend="fused").eval()
    members = [nn.Sequential(*list(m)[:3]) for m in ens.unstack()]  # (registers modules)
    x = torch.randn(5, 6) * 10
    with torch.no_grad():
        expected = torch.stack([m(x) for m in members])
        assert expected.abs().max() > 1  # (the tanh is gone)
        ens(x)
        ens(x)  # no registration since this call: only the deletion can tell
        if how == "delattr":
            delattr(ens, "3")
        else:
            del ens._template[3]  # nn.Sequential.__delitem__: the dict is rebuilt
        torch.testing.assert_close(ens(x), expected, atol=1e-5, rtol=1e-5)


class _OptionalScale(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.scale = nn.Parameter(torch.randn(3))
        self.register_buffer("shift", torch.randn(3))

    def forward(self, x: Tensor) -> Tensor:
        h = self.lin(x)
        if hasattr(self, "scale"):
            h = h * self.scale
        if hasattr(self.lin, "shift"):
            h = h + self.lin.shift
        return h + self.shift if hasattr(self, "shift") else h


@pytest.mark.parametrize("backend", ["fused", "auto"])
@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no_grad"])
def test_a_parameter_or_buffer_deleted_after_calls_is_seen(backend: str, grad: bool):
    """Deleting a tensor calls no hook either: the programs that read it are traced again,
    without it, instead of falling back to vmap (with a warning, for good)."""
    torch.manual_seed(0)
    members = [_OptionalScale() for _ in range(3)]
    ens = ve.Ensemble(copy.deepcopy(members), backend=backend)
    x = torch.randn(5, 3)
    with torch.set_grad_enabled(grad), warnings.catch_warnings():
        warnings.simplefilter("error", ve.FallbackWarning)
        for _ in range(2):
            torch.testing.assert_close(ens(x), torch.stack([m(x) for m in members]))
        for m in [ens, *members]:
            del m.scale  # the root's parameter, through the ensemble
        for _ in range(2):
            torch.testing.assert_close(ens(x), torch.stack([m(x) for m in members]))
        for m in [ens._template, *members]:
            del m.shift  # a buffer, on the template
        torch.testing.assert_close(ens(x), torch.stack([m(x) for m in members]))
        ens.lin.register_buffer("shift", torch.ones(3, 3))  # (registered: seen as before)
        expected = torch.stack([m(x) + 1 for m in members])
        torch.testing.assert_close(ens(x), expected)
    assert "scale" not in dict(ens.named_parameters())


def test_nan_and_inf_in_a_member_show_in_inference_as_in_the_loop():
    """A diverged member must look diverged: no fast path may clamp or drop NaN/inf."""

    def make() -> nn.Module:
        return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))

    ens = ve.Ensemble.from_factory(make, 3, backend="fused")
    loop = ve.Ensemble.from_factory(make, 3, backend="loop")
    with torch.no_grad():
        getattr(ens, "0").weight[1, 0, 0] = float("nan")  # member 1 diverged
        getattr(ens, "0").bias[2, :] = float("inf")  # member 2 overflowed
        loop.load_state_dict(ens.state_dict())
        x = torch.randn(5, 4)
        expected = loop(x)
        for _ in range(3):  # the fast path from the second call on
            out = ens(x)
            assert out[1].isnan().any() and not out[2].isfinite().all()
            torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-5, equal_nan=True)


def test_someone_elses_compiled_model_does_not_recompile_on_our_registration_count():
    """vensemble counts registrations process-wide (vensemble._tree), but not while dynamo
    traces: a compiled forward that assigns a buffer would otherwise guard on the count and
    recompile on every call."""
    from torch._dynamo.testing import CompileCounter

    class Ema(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 4)
            self.register_buffer("avg", torch.zeros(4))

        def forward(self, x: Tensor) -> Tensor:
            y = self.lin(x)
            self.avg = 0.9 * self.avg + 0.1 * y.mean(0)  # a buffer registration each call
            return y - self.avg

    counter = CompileCounter()
    compiled = torch.compile(Ema(), backend=counter)
    x = torch.randn(3, 4)
    with torch.no_grad():
        for _ in range(2):
            compiled(x)
        frames = counter.frame_count
        for _ in range(4):
            compiled(x)
    assert counter.frame_count == frames


def test_calls_from_several_threads_run_one_at_a_time():
    """auto's measurement and the loop put each member's views into the template's slots: a
    call running beside them in another thread read those ("mat2 must be a matrix"), and two
    first calls traced at once saw each other's patched grad-mode switch."""
    errors: list[str] = []
    for _ in range(3):
        torch.manual_seed(0)
        ens = ve.Ensemble.from_factory(_mlp, 16).eval()
        loop = _loop_twin(ens)
        xs = [torch.randn(rows, 6) for rows in (1, 7, 23)]
        with torch.no_grad():
            expected = [loop(x) for x in xs]

        def work(k: int, ens=ens, xs=xs, expected=expected) -> None:
            try:
                with torch.no_grad():
                    for i in range(12):
                        j = (i + k) % len(xs)
                        torch.testing.assert_close(ens(xs[j]), expected[j], atol=1e-5, rtol=1e-5)
            except Exception as err:
                errors.append(repr(err))

        threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert errors == []


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork")
def test_a_child_forked_during_a_call_in_another_thread_can_call():
    """The ensemble's lock, held by a thread that does not exist in a forked child (a
    DataLoader worker, say), hung the child's first call. (One torch thread, as DataLoader
    workers run: a child's first parallel op after the parent's hangs in OpenMP itself.)"""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _fork_during_a_call()
    finally:
        torch.set_num_threads(threads)


def _fork_during_a_call() -> None:
    ens = ve.Ensemble.from_factory(_mlp, 4).eval()
    x = torch.randn(64, 6)
    with torch.no_grad():
        expected = ens(x)
    stop = threading.Event()

    def busy() -> None:
        with torch.no_grad():
            while not stop.is_set():
                ens(x)

    thread = threading.Thread(target=busy)
    thread.start()
    results = []
    try:
        for _ in range(3):
            time.sleep(0.05)
            read, write = os.pipe()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # (fork with threads: Python's, JAX's if loaded)
                pid = os.fork()
            if pid == 0:  # the child: answer within 20 s, or be killed
                os.close(read)
                signal.alarm(20)
                try:
                    with torch.no_grad():
                        ok = torch.allclose(ens(x), expected)
                    os.write(write, b"ok" if ok else b"wrong")
                finally:
                    os._exit(0)
            os.close(write)
            os.waitpid(pid, 0)
            results.append(os.read(read, 16).decode() or "no answer")
            os.close(read)
    finally:
        stop.set()
        thread.join()
    assert results == ["ok"] * 3


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_compile_measures_the_program_without_it_too(monkeypatch, grad: bool):
    """With ``compile`` set, auto measures the fused program eagerly too, and takes it where
    it is faster (a small call: dynamo's guards cost more than the compiled code saves; 1 x
    MLP 16-64-64-1 at 32 rows took 79 us through the loop auto then chose, 40 eagerly)."""
    offered: list[list[str]] = []

    def timings(paths, restore, **kwargs):
        offered.append(list(paths))
        return {k: {"eager": 0.1}.get(k, 1.0) for k in paths}

    monkeypatch.setattr(ensemble_module, "measure_paths", timings)
    ens = ve.Ensemble.from_factory(_mlp, 3, compile=True).eval()
    loop = _loop_twin(ens)
    x = torch.randn(5, 6)
    with torch.set_grad_enabled(grad):
        for _ in range(3):  # measured, then the full path's choice, then the fast path
            torch.testing.assert_close(ens(x), loop(x))
    assert len(offered) == 1 and "eager" in offered[0]
    assert ens.explain()["(auto)"].startswith("eager")
    assert "the fused program runs eagerly" in ens.explain()["(compile)"]
    assert ens._fused.last.compiled is None  # never compiled
    plain = ve.Ensemble.from_factory(_mlp, 3).eval()
    offered.clear()
    with torch.set_grad_enabled(grad):
        plain(x)
    assert offered and "eager" not in offered[0]

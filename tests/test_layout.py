"""The in-major layout of stacked Linear weights: same values, shapes and results as the loop."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import vensemble as ve
from vensemble._layout import in_major


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3, bias=False))


def test_linear_weights_are_stored_in_major_with_the_members_values():
    models = []
    for i in range(3):
        torch.manual_seed(i)
        models.append(_mlp())
    ens = ve.Ensemble(models)
    for name, p in ens.named_parameters():
        assert p.shape[0] == 3
        torch.testing.assert_close(
            p, torch.stack([dict(m.named_parameters())[name] for m in models])
        )
    assert in_major(ens.get_parameter("0.weight")) and in_major(ens.get_parameter("2.weight"))
    assert ens.get_parameter("0.weight").shape == (3, 5, 6)
    for member in ens.unstack():  # members come out as ordinary modules
        assert all(p.is_contiguous() for p in member.parameters())


@pytest.mark.parametrize("backend", ["fused", "vmap", "loop"])
@pytest.mark.parametrize("shared", [True, False])
def test_both_layouts_give_the_loops_outputs_and_gradients(backend: str, shared: bool):
    ens = ve.Ensemble.from_factory(_mlp, 4, backend=backend).double()
    x = torch.randn(7, 6, dtype=torch.float64) if shared else torch.randn(4, 7, 6).double()
    in_dims = None if shared else 0
    members = ens.unstack()
    expected = torch.stack([m(x if shared else x[i]) for i, m in enumerate(members)])
    for layout in ("in-major", "out-major"):
        if layout == "out-major":
            for p in ens.parameters():
                p.data = p.data.contiguous()
        ens.zero_grad()
        out = ens(x, in_dims=in_dims)
        torch.testing.assert_close(out, expected, atol=1e-12, rtol=0)
        out.pow(2).sum().backward()
        for name, p in ens.named_parameters():
            member_grads = []
            for i, m in enumerate(members):
                m.zero_grad()
                m(x if shared else x[i]).pow(2).sum().backward()
                member_grads.append(dict(m.named_parameters())[name].grad)
            torch.testing.assert_close(p.grad, torch.stack(member_grads), atol=1e-12, rtol=0)
            assert p.grad.stride() == p.stride(), f"{layout}: {name}'s gradient has its own layout"


def test_tied_and_parametrized_weights_keep_the_members_layout():
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(10, 4)
            self.head = nn.Linear(4, 10)
            self.head.weight = self.emb.weight

        def forward(self, idx: torch.Tensor) -> torch.Tensor:
            return self.head(self.emb(idx))

    ens = ve.Ensemble.from_factory(Tied, 3, backend="fused")
    assert ens.get_parameter("emb.weight").is_contiguous()
    assert ens.get_parameter("head.weight") is ens.get_parameter("emb.weight")
    idx = torch.randint(0, 10, (5,))
    expected = torch.stack([m(idx) for m in ens.unstack()])
    torch.testing.assert_close(ens(idx), expected, atol=1e-6, rtol=0)


def test_adam_on_in_major_weights_matches_each_member_trained_alone():
    ens = ve.Ensemble.from_factory(_mlp, 3, backend="fused")
    members = ens.unstack()
    opt = ve.MemberOptimizer(torch.optim.Adam, ens, lr=[1e-2, 3e-3, 1e-3])
    alone = [torch.optim.Adam(m.parameters(), lr=lr) for m, lr in zip(members, [1e-2, 3e-3, 1e-3])]
    torch.manual_seed(0)
    for _ in range(20):
        x = torch.randn(8, 6)
        opt.zero_grad()
        ens(x).pow(2).mean(dim=(1, 2)).sum().backward()
        opt.step()
        for m, o in zip(members, alone):
            o.zero_grad()
            m(x).pow(2).mean().backward()
            o.step()
    assert in_major(ens.get_parameter("0.weight"))
    for i, m in enumerate(members):
        for name, p in m.named_parameters():
            torch.testing.assert_close(ens.get_parameter(name)[i], p, atol=1e-5, rtol=0)


def test_state_dict_round_trips_through_files_and_load_state_dict(tmp_path, deterministic):
    ens = ve.Ensemble.from_factory(_mlp, 3)
    other = ve.Ensemble.from_factory(_mlp, 3, seed=10)
    other.load_state_dict(ens.state_dict())
    assert in_major(other.get_parameter("0.weight"))
    x = torch.randn(5, 6)
    torch.testing.assert_close(other(x), ens(x), atol=0, rtol=0)
    ve.save(ens, tmp_path / "e.safetensors")
    loaded = ve.load(tmp_path / "e.safetensors", _mlp)
    assert in_major(loaded.get_parameter("0.weight"))
    torch.testing.assert_close(loaded(x), ens(x), atol=0, rtol=0)


def test_inference_reuses_operand_views_only_while_they_show_the_parameters():
    ens = ve.Ensemble.from_factory(_mlp, 3, backend="fused").double()
    x = torch.randn(5, 6, dtype=torch.float64)

    def expected(inputs: torch.Tensor = x) -> torch.Tensor:
        return torch.stack([m(inputs) for m in ens.unstack()])

    with torch.no_grad():
        torch.testing.assert_close(ens(x), expected(), atol=1e-12, rtol=0)
        for p in ens.parameters():  # in place, as an optimizer step: the views show it
            p.mul_(1.5).add_(0.25)
        torch.testing.assert_close(ens(x), expected(), atol=1e-12, rtol=0)
        first = ens.get_parameter("0.weight")
        first.data = first.data.clone(memory_format=torch.preserve_format) * -1  # new storage
        torch.testing.assert_close(ens(x), expected(), atol=1e-12, rtol=0)
        ens[0].weight = torch.nn.Parameter(torch.randn(3, 5, 6, dtype=torch.float64))  # new object
        ens[0].bias = torch.nn.Parameter(torch.randn(3, 5, dtype=torch.float64))
        torch.testing.assert_close(ens(x), expected(), atol=1e-12, rtol=0)
    ens.float()  # .to() gives every parameter new storage
    torch.testing.assert_close(ens(x.float()), expected(x.float()), atol=1e-5, rtol=0)
    out = ens(x.float())  # with autograd after cached calls: gradients reach the parameters
    out.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in ens.parameters())


def test_large_linear_weights_keep_the_members_layout():
    from vensemble._layout import IN_MAJOR_MAX_ELEMENTS

    side = int(IN_MAJOR_MAX_ELEMENTS**0.5) + 1  # just above the limit
    ens = ve.Ensemble.from_factory(
        lambda: nn.Sequential(nn.Linear(side, side), nn.Linear(side, 4)), 2
    )
    assert ens.get_parameter("0.weight").is_contiguous()  # large: the member's (out, in) layout
    assert in_major(ens.get_parameter("1.weight"))  # small: in-major
    x = torch.randn(3, side)
    expected = torch.stack([m(x) for m in ens.unstack()])
    ens.backend = "fused"
    torch.testing.assert_close(ens(x), expected, atol=1e-4, rtol=1e-5)


def _cnn() -> nn.Module:
    # no bias before BatchNorm: its true gradient is 0, and Adam would scale rounding noise up
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1, bias=False),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 6, 3, stride=2),
        nn.Flatten(),
        nn.Linear(6 * 3 * 3, 2),
    )


def _channels_last_cnn() -> nn.Module:
    return _cnn().to(memory_format=torch.channels_last)


def test_conv2d_weights_keep_the_members_memory_format():
    from vensemble._layout import channels_last_members

    plain = ve.Ensemble.from_factory(_cnn, 3)
    for name in ("0.weight", "3.weight"):  # float32 on the CPU included: the member's layout
        assert plain.get_parameter(name).is_contiguous(), name
    assert all(p.is_contiguous() for m in plain.unstack() for p in m.parameters())

    ens = ve.Ensemble.from_factory(_channels_last_cnn, 3)
    for name in ("0.weight", "3.weight"):
        w = ens.get_parameter(name)
        assert channels_last_members(w) and not w.is_contiguous(), name
        assert w[1].is_contiguous(memory_format=torch.channels_last)
    members = ens.unstack()  # members taken out are laid out as they went in
    assert members[0][0].weight.is_contiguous(memory_format=torch.channels_last)
    assert not members[0][0].weight.is_contiguous()
    torch.testing.assert_close(
        ens.get_parameter("0.weight"), torch.stack([m[0].weight for m in members]), atol=0, rtol=0
    )
    picked = ens.select([2, 0]).get_parameter("0.weight")
    assert channels_last_members(picked) and not picked.is_contiguous()
    torch.testing.assert_close(picked, ens.get_parameter("0.weight")[[2, 0]], atol=0, rtol=0)
    # a mix of layouts stacks in the default one, and says so
    with pytest.warns(UserWarning, match="in different memory layouts") as record:
        mixed = ve.Ensemble([_cnn(), _channels_last_cnn()])
    assert {w.filename for w in record} == {__file__}  # the caller's line, not vensemble's
    assert mixed.get_parameter("0.weight").is_contiguous()


@pytest.mark.parametrize("in_channels, kernel", [(1, 3), (3, 1)], ids=["one-input-channel", "1x1"])
@pytest.mark.parametrize("how", ["members converted", "ensemble converted"])
def test_channels_last_weights_with_a_size_1_dim_keep_the_members_exact_strides(
    in_channels, kernel, how
):
    """With a size-1 dim, channels-last and contiguous coincide for ``is_contiguous``, but not
    for torch's conv, which picks its result's layout from the exact strides: a write through
    ``reshape`` then tells them apart (diff 9.0 before the slices kept the exact strides)."""

    class Written(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c = nn.Conv2d(in_channels, 3, kernel)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.c(x)
            h.reshape(h.shape[0], -1).mul_(0)  # a view (written) only if h is contiguous
            return h

    torch.manual_seed(0)
    members = [Written().to(memory_format=torch.channels_last) for _ in range(3)]
    if how == "members converted":
        ens = ve.Ensemble(members)
    else:
        ens = ve.Ensemble([Written() for _ in range(3)])
        ens.load_state_dict(ve.Ensemble(members).state_dict())
        ens.to(memory_format=torch.channels_last)
    own = members[0].c.weight.stride()
    assert ens.member(0).c.weight.stride() == own
    assert ens.get_parameter("c.weight")[1].stride() == own
    x = torch.randn(2, in_channels, 5, 5)
    expected = torch.stack([m(x) for m in members])
    # (not vmap: inside torch.func.vmap a result's strides are the batched tensor's, which its
    # conv rule lays out contiguous for a one-channel weight: see the README)
    for backend in ("loop", "fused", "auto"):
        ens.backend = backend
        with torch.no_grad():
            torch.testing.assert_close(ens(x), expected, atol=1e-5, rtol=0, msg=backend)


def test_a_memory_format_reaches_an_ensemble_inside_another_module():
    """``model.to(memory_format=...)`` on a model holding ensembles lays out each member's
    tensors and gradients (torch's own would apply it to the stacked 5-d tensors and raise)."""
    torch.manual_seed(0)
    outer = nn.ModuleDict(
        {
            "ens": ve.Ensemble.from_factory(_cnn, 2),
            "mixed": ve.MixedEnsemble([_cnn(), nn.Sequential(nn.Conv2d(3, 2, 1))]),
        }
    )
    outer["ens"](torch.randn(2, 3, 7, 7)).sum().backward()
    outer.to(torch.float64, memory_format=torch.channels_last)
    from vensemble._layout import channels_last_members

    w = outer["ens"].get_parameter("0.weight")
    assert w.dtype == torch.float64 and channels_last_members(w) and not w.is_contiguous()
    assert w.grad is not None and w.grad.stride() == w.stride()  # as Module.to converts grads
    for p in outer["mixed"].parameters():
        assert p.ndim != 5 or p[0].is_contiguous(memory_format=torch.channels_last)
    with pytest.raises(ve.EnsembleError, match=r"'0\.weight'.*rank 5"):
        outer["ens"].to(memory_format=torch.channels_last_3d)


class _ViewAfterConv(nn.Module):
    """The classic CNN idiom: ``x.view(x.size(0), -1)`` after a conv and pooling, which
    raises for a channels-last result."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.fc = nn.Linear(8 * 3 * 3, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.max_pool2d(torch.relu(self.conv(x)), 2)
        return self.fc(x.view(x.size(0), -1))


@pytest.mark.parametrize("backend", ["loop", "vmap", "fused", "auto"])
def test_a_view_of_a_conv_result_runs_as_in_the_member(backend: str):
    torch.manual_seed(0)
    members = [_ViewAfterConv() for _ in range(3)]
    x = torch.randn(5, 3, 8, 8)
    with torch.no_grad():
        expected = torch.stack([m(x) for m in members])
        out = ve.Ensemble(members, backend=backend)(x)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("layout", ["contiguous", "channels-last"])
@pytest.mark.parametrize("backend", ["loop", "fused", "auto"])
def test_convs_train_like_the_members_alone(backend: str, layout: str):
    factory = _cnn if layout == "contiguous" else _channels_last_cnn
    ens = ve.Ensemble.from_factory(factory, 3, backend=backend)
    members = ens.unstack()
    lrs = [1e-2, 3e-3, 1e-3]
    opt = ve.MemberOptimizer(torch.optim.Adam, ens, lr=lrs)
    alone = [torch.optim.Adam(m.parameters(), lr=lr) for m, lr in zip(members, lrs)]
    torch.manual_seed(0)
    for _ in range(10):
        x = torch.randn(4, 3, 7, 7)
        opt.zero_grad()
        out = ens(x)
        outs = [m(x) for m in members]  # once: train-mode BatchNorm updates its running stats
        torch.testing.assert_close(out, torch.stack(outs), atol=1e-5, rtol=0)
        out.pow(2).mean(dim=(1, 2)).sum().backward()
        opt.step()
        for o, y in zip(alone, outs):
            o.zero_grad()
            y.pow(2).mean().backward()
            o.step()
    for i, m in enumerate(members):
        for name, t in m.state_dict().items():
            torch.testing.assert_close(ens.state_dict()[name][i], t, atol=1e-5, rtol=0, msg=name)
    from vensemble._layout import channels_last_members

    w = ens.get_parameter("0.weight")  # the layout survived training
    if layout == "contiguous":
        assert w.is_contiguous()
    else:
        assert channels_last_members(w) and not w.is_contiguous()


def test_conversion_that_swaps_parameters_after_inference_calls():
    """torch's opt-in conversion swaps each parameter in place (``swap_tensors``), which
    refuses a tensor a cached operand view still refers to: the ensemble drops them first."""
    before = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        ens = ve.Ensemble.from_factory(_mlp, 3, backend="fused").eval()
        x = torch.randn(5, 6)
        with torch.no_grad():
            ens(x), ens(x)  # the Linear layers cache their operand views
        weight = ens.get_parameter("0.weight")
        ens.double()
        assert ens.get_parameter("0.weight") is weight  # swapped in place, same object
        expected = torch.stack([m(x.double()) for m in ens.unstack()])
        with torch.no_grad():
            for _ in range(2):
                torch.testing.assert_close(ens(x.double()), expected, atol=1e-12, rtol=0)
    finally:
        torch.__future__.set_swap_module_params_on_conversion(before)

"""Review of session 19's changes (the file split 6e4707b and the audit fixes 97ee45b) for regressions.

Each test pins a behaviour the fixes promise, checked against an independent reference (plain torch,
a per-tensor loop, ``named_parameters``), with cases the fixes' own tests did not use.
"""
from __future__ import annotations

import pickle
import warnings
from typing import Any, Optional

import numpy as np
import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch import nn

import nytorch
import nytorch.functional as nf
from nytorch import Swarm, merge
from nytorch.algorithms import centered_ranks
from conftest import torch_assigns


# -- set_param_config / apply_param_config: names resolved by object ----------------------------------------
class Zoo(nytorch.NytoModule):
    def __init__(self) -> None:
        super().__init__()
        self.seq = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2, bias=False))
        self.plist = nn.ParameterList([nn.Parameter(torch.ones(2)), nn.Parameter(torch.zeros(3))])
        self.pd = nn.ParameterDict({"a": nn.Parameter(torch.ones(1)), "b": nn.Parameter(torch.ones(2))})
        self.md = nn.ModuleDict({"x": nn.Linear(1, 1), "y": nn.Linear(1, 1)})
        self.bn = nn.BatchNorm1d(2)
        self.enc = nn.Linear(2, 2)
        self.dec = nn.Linear(2, 2)
        self.dec.weight = self.enc.weight  # tied: named_parameters lists it once, as enc.weight
        self.shared = self.md["x"]  # one submodule under two names
        self.nobias = nn.Linear(1, 1, bias=False)
        self.plain = torch.ones(1)  # an attribute, neither buffer nor parameter
        self.top = nn.Parameter(torch.ones(1))


def _reference_ids(net: nn.Module, name: str) -> list[int]:
    """The ``named_parameters`` indices of every Parameter object ``name`` reaches (plain torch lookups)."""
    try:
        target: Any = net.get_submodule(name)
        wanted = {id(p) for p in target.parameters()}
    except AttributeError:
        wanted = {id(net.get_parameter(name))}
    return [i for i, (_, p) in enumerate(net.named_parameters()) if id(p) in wanted]


FOUND = ["seq", "seq.0", "seq.0.weight", "seq.1", "plist", "plist.0", "plist.1", "pd", "pd.a", "md", "md.x",
         "md.x.weight", "md.y.bias", "bn", "bn.weight", "enc", "dec", "dec.weight", "dec.bias", "shared",
         "shared.weight", "top"]
UNKNOWN = ["seq.2.bias", "plist.2", "bn.running_mean", "bn.num_batches_tracked", "nobias.bias", "plain", "top.x",
           "", ".", "seq.", ".seq", "seq..0", "nope", "seq.0.nope", "training", "seq.0.weight.data"]


@pytest.mark.parametrize("name", FOUND)
def test_apply_param_config_reaches_what_torch_lookups_reach(name: str) -> None:
    net = Zoo()
    got: list[int] = []
    net.apply_param_config(lambda pid, config: got.append(pid), name=name)
    assert got == _reference_ids(net, name)


@pytest.mark.parametrize("name", UNKNOWN)
def test_unknown_names_keep_their_message(name: str) -> None:
    # buffers, plain attributes, None parameters and malformed paths: the message of 9ea248c, unchanged
    with pytest.raises(ValueError, match=rf"^set_param_config: Zoo has no submodule or parameter named "
                                         rf"{name!r}".replace(".", r"\.") + "$"):
        Zoo().set_param_config(operational=False, name=name)


def test_set_param_config_on_a_pending_result_and_through_a_tie() -> None:
    net = Zoo()
    result = net + 1  # possibly a result whose tree is built on first touch
    got: list[int] = []
    result.apply_param_config(lambda pid, config: got.append(pid), name="dec")
    assert got == _reference_ids(net, "dec")
    net.set_param_config(operational=False, name="dec")
    doubled = 2 * net
    for (name, new), old in zip(doubled.named_parameters(), net.parameters()):
        frozen = name in ("enc.weight", "dec.bias")  # dec's Parameters, the tied one listed as enc.weight
        assert torch.equal(new, old if frozen else 2 * old), name


# -- written once: a buffer that is a parameter's tensor under a second name --------------------------------
class TiedBuffer(nn.Module):
    def __init__(self, alias: str = "same") -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2)
        with torch.no_grad():
            self.lin.weight.copy_(torch.arange(6.0).view(2, 3))
        weight = self.lin.weight.detach()
        self.register_buffer("w", {"same": weight, "flat": weight.view(-1), "t": weight.t(), "part": weight[0]}[alias])
        self.register_buffer("own", torch.ones(2))


def test_particle_iadd_writes_a_tied_buffer_once() -> None:
    model = TiedBuffer()
    weight, own = model.lin.weight.detach().clone(), model.own.clone()
    p = nytorch.particle(model, buffers=True)
    p += 1
    assert torch.equal(model.lin.weight.detach(), weight + 1)  # plain torch: one add_ on that memory
    assert model.w.data_ptr() == model.lin.weight.data_ptr() and torch.equal(model.own, own + 1)


@pytest.mark.parametrize("buffers", ["average", "copy", "keep"])
def test_ema_plans_a_tied_buffer_once(buffers: str) -> None:
    target, online = TiedBuffer(), TiedBuffer()
    with torch.no_grad():
        target.lin.weight.zero_()
        online.lin.weight.fill_(1.0)
        online.own.fill_(3.0)
    merge.ema_(target, online, decay=0.5, buffers=buffers)
    # reference: torch.lerp once per parameter, then the untied buffer per mode
    assert torch.equal(target.lin.weight.detach(), torch.lerp(torch.zeros(2, 3), torch.ones(2, 3), 0.5))
    expected_own = {"average": torch.full((2,), 2.0), "copy": torch.full((2,), 3.0), "keep": torch.ones(2)}[buffers]
    assert torch.equal(target.own, expected_own)


@pytest.mark.parametrize("buffers", ["average", "copy"])
def test_ema_class_updates_a_tied_buffer_once(buffers: str) -> None:
    model = TiedBuffer()
    with torch.no_grad():
        model.lin.weight.zero_()
    ema = merge.EMA(model, decay=0.5, buffers=buffers)
    with torch.no_grad():
        model.lin.weight.fill_(1.0)
    ema.update()
    out = TiedBuffer()
    ema.copy_to(out)
    reference = torch.lerp(torch.zeros(2, 3), torch.ones(2, 3), 0.5)  # one lerp of that memory, not two
    assert torch.equal(out.lin.weight.detach(), reference) and torch.equal(out.w, reference)


# fixed (review finding): an alias of another shape over the same memory is written once too
@pytest.mark.parametrize("alias", ["flat", "t"])
def test_tied_buffer_of_another_view_is_written_once(alias: str) -> None:
    model = TiedBuffer(alias)
    weight = model.lin.weight.detach().clone()
    p = nytorch.particle(model, buffers=True)
    p += 1
    assert torch.equal(model.lin.weight.detach(), weight + 1)
    for buffers in ("average", "copy"):
        target, online = TiedBuffer(alias), TiedBuffer(alias)
        with torch.no_grad():
            target.lin.weight.zero_()
            online.lin.weight.fill_(1.0)
        merge.ema_(target, online, tau=0.5, buffers=buffers)
        reference = torch.lerp(torch.zeros(2, 3), torch.ones(2, 3), 0.5)  # one lerp of that memory
        assert torch.equal(target.lin.weight.detach(), reference), buffers


def test_written_once_skips_empty_and_meta_leaves() -> None:
    from nytorch._algebra import written_once
    empty, meta = torch.empty(0), torch.empty(2, device="meta")
    assert written_once([empty, empty.detach(), meta, meta.detach()], [True] * 4) == [True] * 4
    w = torch.ones(2, 2)
    assert written_once([w, w.detach(), w[0], w.t()], [True, True, True, False]) == [True, False, True, False]


# -- Swarm: numbers a later group cannot hold ---------------------------------------------------------------
class Mixed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(1, 1)  # float32 first: written before the float16 group in the old code
        self.h = nn.Linear(1, 1).half()


@pytest.mark.parametrize("alpha", [1e10, np.float64(-1e10), np.float32(1e10), np.int64(10**12), 70000.0])
def test_swarm_add_alpha_too_large_for_float16_changes_nothing(alpha: Any) -> None:
    with pytest.raises(RuntimeError):  # what torch says for that float16 tensor alone
        torch.zeros(1, dtype=torch.float16).add_(torch.ones(1, dtype=torch.float16), alpha=float(alpha))
    swarm = Swarm.zeros(Mixed(), 2)
    before = {name: value.clone() for name, value in swarm.params.items()}
    with pytest.raises(RuntimeError, match=r"^add_: torch cannot apply the number .* to parameter 'h\.weight' "
                                           r"\(float16\): .*; nothing was changed$"):
        swarm.add_(1.0, alpha=alpha)
    for name, value in swarm.params.items():
        assert torch.equal(value, before[name]), name


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), 1e10])
def test_swarm_setitem_numbers_torch_accepts_still_write(value: float) -> None:
    swarm = Swarm.zeros(Mixed(), 2)
    # A member's float16 values (h.weight, h.bias) are written as one row of two: torch 2.15 refuses 1e10
    # in a write of several float16 values, where 2.13 stores inf. Refused, the swarm writes nothing.
    if not torch_assigns(torch.zeros(2, 2, dtype=torch.float16), 0, value):
        with pytest.raises(RuntimeError, match=r"^Swarm\.__setitem__: torch cannot apply the number .* \(float16\): "
                                               r".*; nothing was changed$"):
            swarm[0] = value
        assert all(torch.equal(stacked, torch.zeros_like(stacked)) for stacked in swarm.params.values())
        return
    swarm[0] = value
    for name, stacked in swarm.params.items():
        reference = torch.zeros_like(stacked[0])
        reference[...] = value  # plain torch's conversion (float16 overflows to inf without an error in 2.13)
        assert torch.equal(stacked[0], reference) and torch.equal(stacked[1], torch.zeros_like(stacked[1])), name


def test_swarm_setitem_number_beyond_float32_changes_nothing() -> None:
    swarm = Swarm.zeros(Mixed(), 2)
    with pytest.raises(RuntimeError, match=r"^Swarm\.__setitem__: torch cannot apply the number 1e\+39 to "
                                           r"parameter 'a\.weight' \(float32\)"):
        swarm[1] = 1e39
    assert all(torch.equal(v, torch.zeros_like(v)) for v in swarm.params.values())


@pytest.mark.parametrize("mode", [np.bool_(True), 1, 0, None, torch.tensor(True)])
def test_swarm_train_refuses_what_nn_module_train_refuses(mode: Any) -> None:
    with pytest.raises(ValueError, match="training mode is expected to be boolean"):
        nn.Linear(1, 1).train(mode)
    swarm = Swarm.zeros(nn.Dropout(), 2)
    with pytest.raises(ValueError, match=r"^Swarm\.train: expected a bool as mode \(as nn\.Module\.train\)"):
        swarm.train(mode)
    assert swarm.train(False).training is False and swarm.train().training is True


# -- centered_ranks --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [1, 2, 3, 7, 2049, 3000])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int64])
def test_centered_ranks_is_the_exact_rank_rounded_once(size: int, dtype: torch.dtype) -> None:
    losses = torch.randperm(size, generator=torch.Generator().manual_seed(size)).to(dtype)
    ranks = centered_ranks(losses)
    out = dtype if dtype.is_floating_point else torch.get_default_dtype()
    order = losses.double().argsort(stable=True)
    exact = torch.empty(size, dtype=torch.float64)  # (2r - span) / (2 span) in float64: exact for these sizes
    span = max(size - 1, 1)
    exact[order] = (2 * torch.arange(size, dtype=torch.float64) - span) / (2 * span)
    assert ranks.dtype == out and torch.equal(ranks, exact.to(out))
    assert float(ranks.min()) == -0.5 and (size == 1 or float(ranks.max()) == 0.5)
    assert bool((ranks[order][1:] >= ranks[order][:-1]).all())


def test_centered_ranks_ties_take_distinct_ranks_in_order() -> None:
    assert torch.equal(centered_ranks(torch.tensor([1.0, 1.0, 1.0])), torch.tensor([-0.5, 0.0, 0.5]))
    assert torch.equal(centered_ranks(torch.tensor([2.0, 1.0])), torch.tensor([0.5, -0.5]))


# -- bind, forward mode, packing under FakeTensorMode, tensorless swarms in checkpoints ----------------------
def test_bind_detaches_only_buffers_that_carry_a_graph() -> None:
    bn = nn.BatchNorm1d(2).eval()
    state = nf.state(bn)
    mean = (state["running_mean"].clone().requires_grad_() * 1.0)
    bound = nf.bind(bn, {**state, "running_mean": mean})
    x = torch.randn(3, 2)
    assert not bound.running_mean.requires_grad and bound.running_mean.data_ptr() == mean.data_ptr()
    assert torch.allclose(bound(x), nn.functional.batch_norm(x, mean.detach(), state["running_var"],
                                                               state["weight"], state["bias"]))
    plain = dict(state)
    assert nf.bind(bn, plain).running_mean is plain["running_mean"]  # no graph: the very tensor, as before


def test_inplace_arithmetic_under_dual_level_drops_tangents() -> None:
    model = nn.Linear(2, 2)
    weight = model.weight.detach().clone()
    p = nytorch.particle(model)
    with fwAD.dual_level():
        two = fwAD.make_dual(torch.tensor(2.0), torch.tensor(1.0))
        p *= two
        q = p * two
        assert fwAD.unpack_dual(model.weight).tangent is None
        assert fwAD.unpack_dual(q.params["weight"]).tangent is None
        q.copy_to(model)
    assert torch.equal(model.weight.detach(), weight * 2 * 2)


def test_pack_under_fake_tensor_mode_leaves_every_group_real() -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode

    from nytorch._packing import pack_

    class TwoGroups(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(2, 2)
            self.b = nn.Linear(2, 2).double()

    model = TwoGroups()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with FakeTensorMode(allow_non_fake_inputs=True):
        assert pack_(model) is False
    for name, value in model.state_dict().items():
        assert type(value) is torch.Tensor and torch.equal(value, before[name]), name
    assert pack_(model) is True


def test_tensorless_swarm_checkpoint_keeps_its_size(tmp_path: Any) -> None:
    from nytorch import StructureError
    path = str(tmp_path / "relu.nyto")
    nytorch.save(Swarm.stack([nn.ReLU()] * 3), path)
    assert len(nytorch.load(path, like=Swarm.stack([nn.ReLU()] * 3))) == 3
    for size in (2, 0):
        like = Swarm.stack([nn.ReLU()] * 3)[list(range(size))]
        with pytest.raises(StructureError, match=rf"like is a swarm of {size} members, the checkpoint holds one of 3"):
            nytorch.load(path, like=like)


# -- the split: pickles made before it name classes by their old module paths ---------------------------------
@pytest.mark.parametrize("path", ["nytorch._flat.Flat", "nytorch._flat.FlatPlan", "nytorch._walk.Layout",
                                  "nytorch._swarm_spec.Spec", "nytorch._particle.Particle", "nytorch._swarm.Swarm",
                                  "nytorch._config.ParamConfig", "nytorch.merge._ema.Plan",
                                  "nytorch.merge._ema_model.EMA", "nytorch.merge._state.Operand",
                                  "nytorch.merge._watch.Configs", "nytorch.merge._schedule._power",
                                  "nytorch.merge._schedule._warmup"])
def test_pickled_names_of_9ea248c_still_resolve(path: str) -> None:
    # every global a pickle of a model, result, Particle, Swarm, EMA or schedule made at 9ea248c refers to
    module, _, name = path.rpartition(".")
    found = pickle.loads(pickle.dumps(getattr(__import__(module, fromlist=[name]), name)))
    assert f"{found.__module__}.{found.__qualname__}" == path


def test_objects_round_trip_through_pickle_with_their_values() -> None:
    torch.manual_seed(0)
    net = Zoo()
    net.set_param_config(operational=False, name="bn")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        objects: list[Any] = [net, net + 1, nytorch.particle(net, buffers=True), Swarm.randn(nn.Linear(2, 2), 3),
                              merge.EMA(nn.Linear(2, 2), decay=0.9), merge.power_decay(0.99)]
    for obj in objects:
        back = pickle.loads(pickle.dumps(obj))
        assert type(back) is type(obj)
        values: Optional[dict[str, torch.Tensor]] = (obj.state_dict() if isinstance(obj, nn.Module)
                                                     else getattr(obj, "params", None))
        if values is not None:
            again = back.state_dict() if isinstance(back, nn.Module) else back.params
            assert values.keys() == again.keys() and all(torch.equal(values[k], again[k]) for k in values)


# -- dare's generator check (97ee45b) must not refuse what torch.rand accepts (fixed: meta leaves skipped) --
def test_dare_on_meta_models_takes_a_cpu_generator_as_torch_rand_does() -> None:
    generator = torch.Generator().manual_seed(0)
    assert torch.rand(2, device="meta", generator=generator).device.type == "meta"  # torch's rule
    with pytest.raises(RuntimeError):
        torch.Generator(device="meta")  # so a "generator on meta" cannot be made at all
    base, tuned = nn.Linear(2, 2, device="meta"), [nn.Linear(2, 2, device="meta") for _ in range(2)]
    merged = merge.dare(base, tuned, drop=0.5, generator=generator)
    assert type(merged) is nn.Linear
    assert all(t.device.type == "meta" and t.shape == r.shape for t, r in zip(merged.parameters(), base.parameters()))


@pytest.mark.parametrize("alias", ["same", "flat", "t", "part"])
@pytest.mark.parametrize("pack", [True, False])
def test_ema_class_average_keeps_every_alias_of_a_weight_current(alias: str, pack: bool) -> None:
    # EMA's own copy keeps only same-view ties: a buffer over the weight in another view is its own
    # tensor there, so it must be averaged too, not skipped as an in-place update would skip it
    model = TiedBuffer(alias)
    with torch.no_grad():
        model.lin.weight.zero_()
    ema = merge.EMA(model, decay=0.5, pack=pack)
    with torch.no_grad():
        model.lin.weight.fill_(1.0)
    ema.update()
    reference = torch.lerp(torch.zeros(2, 3), torch.ones(2, 3), 0.5)
    view = {"same": reference, "flat": reference.view(-1), "t": reference.t(), "part": reference[0]}[alias]
    averaged = ema.averaged
    assert torch.equal(averaged.lin.weight.detach(), reference) and torch.equal(averaged.w, view)


class TwoViews(nn.Module):
    """Two Parameters over one storage, in two views: ``b`` is ``a`` transposed."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.zeros(2, 3))
        self.b = nn.Parameter(self.a.data.t())


def test_ema_writes_two_parameters_over_one_memory_in_two_views_once() -> None:
    # as Particle in-place operators do (``written_once``): ``ema_`` plans its ties with the same helper
    target, online = TwoViews(), TwoViews()
    with torch.no_grad():
        online.a.fill_(1.0)
    merge.ema_(target, online, tau=0.5)
    reference = torch.lerp(torch.zeros(2, 3), torch.ones(2, 3), 0.5)  # one lerp of that memory, not two
    assert torch.equal(target.a.detach(), reference) and torch.equal(target.b.detach(), reference.t())
    p = nytorch.particle(target)
    p += 1
    assert torch.equal(target.a.detach(), reference + 1)

"""Unusual parameter memory layouts against per-tensor torch: packing must not change what the user chose.

Covers channels_last weights whose unit dimensions make them "contiguous", models in shared memory,
conjugate / negative views, zero-size and 0-dim parameters, tied and overlapping parameters, swaps of
a packed model's storage (``.to``, ``.double()``, ``swap_tensors``, ``load_state_dict(assign=True)``)
and repeated packing.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import nytorch as nyto
from nytorch import _packing, merge

CL = torch.channels_last


def _reference(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: param.detach().clone() for name, param in model.named_parameters()}


# -- channels_last weights that are also "contiguous" ----------------------------------------------
@pytest.mark.parametrize("conv", [
    lambda: nn.Conv2d(1, 8, 3),  # one input channel (an MNIST stem)
    lambda: nn.Conv2d(4, 8, 1),  # pointwise
    lambda: nn.Conv2d(8, 8, 3, groups=8, padding=1),  # depthwise
], ids=["one-input-channel", "1x1", "depthwise"])
@pytest.mark.parametrize("use", ["particle", "ema", "operator"])
def test_channels_last_weights_with_unit_dimensions_keep_their_strides(conv, use) -> None:
    torch.manual_seed(0)
    layer = conv()
    model = nn.Sequential(layer).to(memory_format=CL)
    strides = layer.weight.stride()
    # "contiguous", yet not the default strides: convolutions follow this weight's channels_last format
    assert layer.weight.is_contiguous() and strides != torch.empty(layer.weight.shape).stride()
    x = torch.randn(2, layer.in_channels, 6, 6)
    expected = model(x)
    reference = _reference(model)
    if use == "particle":
        result = (nyto.particle(model) + 1).params
    elif use == "ema":
        ema = merge.EMA(model, decay=0.5)
        result = {name: p.detach() + 1 for name, p in ema.averaged.named_parameters()}
        assert ema.averaged[0].weight.stride() == strides
    else:
        result = {name: p.detach() for name, p in merge.average([model, model]).named_parameters()}
        result = {name: value + 1 for name, value in result.items()}
    assert layer.weight.stride() == strides  # the user's memory format is kept
    out = model(x)
    assert out.stride() == expected.stride() and torch.equal(out, expected)
    for name, value in reference.items():
        assert torch.equal(result[name], value + 1), name


def test_flatten_names_the_channels_last_parameter_it_refuses() -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.Conv2d(3, 4, 1)).to(memory_format=CL)
    with pytest.raises(ValueError, match=r"flatten_: cannot pack the parameters of this Sequential: parameter "
                                         r"'1\.weight' has strides \(3, 1, 3, 3\), not the contiguous "
                                         r"\(3, 1, 1, 1\) \(e\.g\. channels_last\)"):
        nyto.flatten_(model)
    assert model[1].weight.stride() == (3, 1, 3, 3)


def test_channels_last_3d_pointwise_weights_keep_their_strides() -> None:
    model = nn.Sequential(nn.Conv3d(4, 2, 1)).to(memory_format=torch.channels_last_3d)
    strides = model[0].weight.stride()
    x = torch.randn(1, 4, 3, 3, 3)
    expected = model(x)
    doubled = (nyto.particle(model) * 2.0).params["0.weight"]
    assert model[0].weight.stride() == strides == (4, 1, 4, 4, 4)
    assert torch.equal(doubled, model[0].weight.detach() * 2)
    out = model(x)
    assert out.stride() == expected.stride() and torch.equal(out, expected)


# -- share_memory() --------------------------------------------------------------------------------
def test_a_model_in_shared_memory_stays_there() -> None:
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2)).share_memory()
    before = [p.data_ptr() for p in model.parameters()]
    seen = model[0].weight.detach()  # what another process holding the shared block sees
    reference = _reference(model)
    p = nyto.particle(model)
    assert [q.data_ptr() for q in model.parameters()] == before
    assert all(q.is_shared() for q in model.parameters())
    p += 1.0
    assert torch.equal(seen, reference["0.weight"] + 1)
    assert all(torch.equal(q.detach(), reference[name] + 1) for name, q in model.named_parameters())
    with pytest.raises(ValueError, match=r"flatten_: cannot pack the parameters of this Sequential: parameter "
                                         r"'0\.weight' is in shared memory \(share_memory\(\)\): packing would "
                                         r"move it out of it; pack before share_memory\(\)"):
        nyto.flatten_(model)


def test_a_model_packed_before_share_memory_stays_packed_and_shared() -> None:
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2))
    p = nyto.particle(model)
    _ = p + 1.0  # the Particle has found its buffer
    model.share_memory()
    before = [q.data_ptr() for q in model.parameters()]
    reference = _reference(model)
    p += 1.0  # the storage moved into shared memory under the Particle: it follows
    nyto.particle(model)
    assert [q.data_ptr() for q in model.parameters()] == before
    assert all(q.is_shared() for q in model.parameters())
    assert all(torch.equal(q.detach(), reference[name] + 1) for name, q in model.named_parameters())
    assert _packing._consecutive(list(model.parameters()))


# -- conjugate and negative views ------------------------------------------------------------------
def test_conjugate_and_negative_views_lying_back_to_back_compute_their_own_values() -> None:
    torch.manual_seed(0)
    storage = torch.randn(6, dtype=torch.cfloat)

    class Complex(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Parameter(storage[:3].conj())
            self.b = nn.Parameter(storage[3:])

    real = torch.randn(6)

    class Negative(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Parameter(real[:3])
            self.b = nn.Parameter(torch._neg_view(real[3:]))

    for make in (Complex, Negative):
        model = make()
        reference = {name: param.detach().resolve_conj().resolve_neg().clone()
                     for name, param in model.named_parameters()}
        p = nyto.particle(model)
        doubled = (p * 2.0).params
        for name, value in reference.items():
            assert torch.equal(doubled[name].resolve_conj().resolve_neg(), value * 2), (make.__name__, name)
            assert torch.equal(getattr(model, name).detach().resolve_conj().resolve_neg(), value)
        p += 1.0
        for name, value in reference.items():
            assert torch.equal(getattr(model, name).detach().resolve_conj().resolve_neg(), value + 1)


# -- zero-size and 0-dim parameters --------------------------------------------------------------
class _Dummy(nyto.NytoModule):
    """The "parameter to find the device by" idiom: an empty Parameter before the real ones."""

    def __init__(self) -> None:
        super().__init__()
        self.dummy = nn.Parameter(torch.empty(0))
        self.fc = nn.Linear(3, 4)
        self.empty = nn.Parameter(torch.empty(0, 3))
        self.scale = nn.Parameter(torch.tensor(1.5))
        self.low = nn.Parameter(torch.tensor([0.25, 2.0], dtype=torch.float16))


def test_zero_size_parameters_do_not_stop_packing_or_repack_on_every_use() -> None:
    torch.manual_seed(0)
    model = _Dummy()
    p = nyto.particle(model)
    pointers, packs = [q.data_ptr() for q in model.parameters()], _packing.PACKED[0]
    assert p._flat_form() is not None  # the one-pass path
    again = nyto.particle(model)
    assert [q.data_ptr() for q in model.parameters()] == pointers and _packing.PACKED[0] == packs
    reference = _reference(model)
    for result, expected in ((p + again, {k: v + v for k, v in reference.items()}),
                             (p * 0.3, {k: v * 0.3 for k, v in reference.items()}),
                             (p.lerp(again * 2.0, 0.25), {k: torch.lerp(v, v * 2.0, 0.25) for k, v in reference.items()})):
        for name, value in expected.items():
            got = result.params[name]
            assert got.shape == value.shape and got.dtype == value.dtype and torch.equal(got, value), name
    summed = model + model  # NytoModule operators take the packed path too
    assert "_nyto_pending" in summed.__dict__
    assert all(torch.equal(q, reference[name] * 2) for name, q in summed.named_parameters())
    p += 1.0
    assert all(torch.equal(q.detach(), reference[name] + 1) for name, q in model.named_parameters())
    assert [q.data_ptr() for q in model.parameters()] == pointers


def test_a_group_of_only_zero_size_parameters() -> None:
    class Empty(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Parameter(torch.empty(0, 2))
            self.b = nn.Parameter(torch.empty(0))
            self.c = nn.Parameter(torch.ones(2, dtype=torch.float64))

    model = Empty()
    nyto.flatten_(model)
    p = nyto.particle(model)
    assert p._flat_form() is not None
    result = (p + 1.0).params
    assert [tuple(v.shape) for v in result.values()] == [(0, 2), (0,), (2,)]
    assert torch.equal(result["c"], torch.full((2,), 2.0, dtype=torch.float64))


# -- messages name the parameter -------------------------------------------------------------------
def test_refusals_name_the_parameters() -> None:
    with torch.device("meta"):
        meta = nn.Linear(2, 2)
    with pytest.raises(ValueError, match=r"Linear: parameter 'weight' is on the meta device"):
        nyto.flatten_(meta)

    class Overlap(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.randn(4))
            self.register_buffer("view", self.w.detach()[1:3])

    with pytest.raises(ValueError, match=r"parameter 'w' and buffer 'view' share memory: packing would untie them"):
        nyto.flatten_(Overlap())


def test_tensor_subclass_parameters_take_the_per_tensor_path() -> None:
    from torch.testing._internal.two_tensor import TwoTensor

    torch.manual_seed(0)

    class Wrapped(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(TwoTensor(torch.randn(3), torch.randn(3)))
            self.b = nn.Parameter(torch.randn(2))

    model = Wrapped()
    inner = (model.w.a.clone(), model.w.b.clone())
    result = (nyto.particle(model) * 2.0).params["w"]  # raised a bare RuntimeError from data_ptr
    assert type(result) is TwoTensor
    assert torch.equal(result.a, inner[0] * 2) and torch.equal(result.b, inner[1] * 2)
    with pytest.raises(ValueError, match=r"flatten_: cannot pack the parameters of this Wrapped: parameter 'w' is "
                                         r"a TwoTensor, a tensor subclass whose values live in the tensors it wraps"):
        nyto.flatten_(model)


# -- what was found right, kept so --------------------------------------------------------------
class _Tied(nyto.NytoModule):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(5, 3)
        self.out = nn.Linear(3, 5, bias=False)
        self.out.weight = self.emb.weight


def test_tied_embedding_and_output_weights() -> None:
    torch.manual_seed(0)
    model = _Tied()
    weight = model.emb.weight.detach().clone()
    result = model * 2.0 + model
    assert result.out.weight is result.emb.weight and torch.equal(result.emb.weight, weight * 2 + weight)
    model += 1.0
    assert model.out.weight is model.emb.weight and torch.equal(model.emb.weight, weight + 1)


@pytest.mark.parametrize("swap", [False, True])
def test_conversions_after_packing_are_noticed(swap: bool) -> None:
    torch.manual_seed(0)
    previous = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(swap)
    try:
        model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2))
        p = nyto.particle(model)
        _ = p + 1.0
        weight = model[0].weight
        model.double()
        assert model[0].weight is weight
        reference = _reference(model)
        tripled = (p * 3.0).params  # the Particle made before reads the new storage
        assert all(tripled[k].dtype == torch.float64 and torch.equal(tripled[k], v * 3) for k, v in reference.items())
        p += 1.0
        assert all(torch.equal(q.detach(), reference[k] + 1) for k, q in model.named_parameters())
        model.to(memory_format=CL)  # nothing 4-D: a no-op
        model.half()
        halves = (nyto.particle(model) * 0.5).params
        assert all(v.dtype == torch.float16 for v in halves.values())
    finally:
        torch.__future__.set_swap_module_params_on_conversion(previous)


_SAME_ADDRESS = {  # a view of the parameter's own memory: the address stays, the shape or strides change
    "prefix slice": lambda w: w[:2],
    "transpose": lambda w: w.t(),
    "reshape": lambda w: w.view(2, 8),
}


class _Net(nyto.NytoModule):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.out = nn.Linear(4, 2)


@pytest.mark.parametrize("swap", list(_SAME_ADDRESS), ids=list(_SAME_ADDRESS))
@pytest.mark.parametrize("use", ["particle", "operator", "ema", "ema-unpacked"])
def test_a_data_swap_that_keeps_the_address_is_noticed(swap: str, use: str) -> None:
    """``w.data = w.data[:2]`` (the slimming idiom), ``.t()``, ``.view()``: same address, new shape or strides."""
    torch.manual_seed(0)
    model = _Net()
    p = nyto.particle(model)
    ema = merge.EMA(model, decay=0.5, pack=use != "ema-unpacked") if use.startswith("ema") else None
    _ = model * 2.0, p * 2.0  # every check has run once and remembered what it saw
    if ema is not None:
        ema.update()
    weight = model.fc.weight
    before = weight.data_ptr()
    weight.data = _SAME_ADDRESS[swap](weight.data)
    assert weight.data_ptr() == before
    if use == "particle":
        result = (p * 2.0).params
        assert result["fc.weight"].shape == weight.shape and torch.equal(result["fc.weight"], weight.detach() * 2)
        p += 1.0  # in place too: the model's own (swapped) tensor is what gets written
        assert torch.equal(nyto.particle(model).params["fc.weight"], result["fc.weight"] / 2 + 1)
    elif use == "operator":
        result = model * 2.0
        assert result.fc.weight.shape == weight.shape and torch.equal(result.fc.weight, weight.detach() * 2)
    elif ema is not None and weight.shape == (4, 4):  # the transpose keeps the shape: averaged as it now is
        average = ema.averaged.fc.weight.detach().clone()
        ema.update()
        assert torch.equal(ema.averaged.fc.weight, average.lerp(weight.detach(), 0.5))
    else:
        assert ema is not None
        with pytest.raises(nyto.StructureError, match=r"EMA.update: parameter 'fc.weight' differs: shape \(4, 4\)"):
            ema.update()


def test_swap_tensors_and_assign_load_after_packing() -> None:
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2))
    p = nyto.particle(model)
    _ = p + 1.0
    torch.utils.swap_tensors(model[0].weight, nn.Parameter(torch.full((3, 3), 7.0)))
    assert torch.equal((p + 0.5).params["0.weight"], torch.full((3, 3), 7.5))
    state = {k: torch.randn_like(v) for k, v in model.state_dict().items()}
    model.load_state_dict(state, assign=True)
    result = nyto.particle(model) - 1.0
    assert all(torch.equal(result.params[k], v - 1) for k, v in state.items())


def test_channels_last_after_packing_keeps_values_and_format() -> None:
    torch.manual_seed(0)

    class Net(nyto.NytoModule):
        def __init__(self) -> None:
            super().__init__()
            self.c1, self.c2 = nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 1)

    model = Net()
    _ = model + 1.0  # packed
    model.to(memory_format=CL)
    reference = _reference(model)
    result = model * 2.0
    assert result.c1.weight.is_contiguous(memory_format=CL)
    assert all(torch.equal(q, reference[k] * 2) for k, q in result.named_parameters())
    model += 1.0
    assert model.c1.weight.is_contiguous(memory_format=CL) and model.c2.weight.stride() == (4, 1, 4, 4)
    assert all(torch.equal(q, reference[k] + 1) for k, q in model.named_parameters())


def test_overlapping_and_expanded_parameters_follow_the_per_tensor_loop() -> None:
    storage = torch.randn(6)

    class Overlap(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Parameter(storage[:4])
            self.b = nn.Parameter(storage[2:])

    model = Overlap()
    expected = storage.clone()
    expected[:4] += 1
    expected[2:] += 1  # the per-tensor loop: the overlap is written twice
    doubled = (nyto.particle(model) * 2.0).params
    assert torch.equal(doubled["a"], storage[:4] * 2) and torch.equal(doubled["b"], storage[2:] * 2)
    p = nyto.particle(model)
    p += 1.0
    assert torch.equal(storage, expected)

    class Expanded(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.x = nn.Parameter(torch.randn(3, 1).expand(3, 4))

    model = Expanded()
    assert torch.equal((nyto.particle(model) + 1.0).params["x"], model.x.detach() + 1)
    with pytest.raises(RuntimeError, match=r"add: parameter 'x' \(shape \(3, 4\) float32\) has elements sharing "
                                           r"memory \(an expanded view\)"):
        q = nyto.particle(model)
        q += 1.0


def test_a_submodule_shared_by_two_models_stays_one_value() -> None:
    torch.manual_seed(0)
    shared = nn.Linear(4, 4)
    first, second = nn.Sequential(shared, nn.Linear(4, 2)), nn.Sequential(nn.Linear(4, 3), shared)
    p1, p2 = nyto.particle(first), nyto.particle(second)  # packing the second moves the shared layer
    weight = shared.weight.detach().clone()
    p1 += 1.0
    p2 += 1.0
    assert torch.equal(shared.weight.detach(), weight + 2)
    assert torch.equal((p1 * 1.0).params["0.weight"], weight + 2)
    assert torch.equal((p2 * 1.0).params["1.weight"], weight + 2)


@pytest.mark.parametrize("use", ["particle", "unpacked", "ema"])
def test_a_sparse_parameter_is_named_before_anything_runs(use: str) -> None:
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
    model[1].weight = nn.Parameter(torch.randn(3, 3).to_sparse())
    before = {name: param.detach().to_dense() for name, param in model.named_parameters()}
    call = {"particle": lambda: nyto.particle(model) + 1.0, "unpacked": lambda: nyto.particle(model, pack=False) + 1.0,
            "ema": lambda: merge.EMA(model)}[use]
    with pytest.raises(TypeError, match=r"Sequential: expected dense \(strided\) parameters, but parameter "
                                        r"'1.weight' has layout torch.sparse_coo.*\.to_dense\(\)"):
        call()
    assert all(torch.equal(param.detach().to_dense(), before[name]) for name, param in model.named_parameters())

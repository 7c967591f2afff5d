# mypy: disable-error-code="union-attr, index, operator, arg-type, assignment"
# (nn.Module.__getattr__ is typed `Tensor | Module`: attribute access on models is untyped noise here)
"""Shared sample models, reference helpers and hypothesis strategies for the core tests.

Everything here is plain PyTorch: the reference computations the tests compare
nytorch against are per-tensor loops over ``named_parameters()`` written below,
never nytorch itself.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from hypothesis import strategies as st
from torch import nn

import nytorch as nyto
from nytorch import _builder

Tensor = torch.Tensor

#: How many uses of a structure nytorch waits for before compiling its code (``_builder.COMPILE_AFTER``).
PRODUCTION_COMPILE_AFTER = _builder.COMPILE_AFTER


@pytest.fixture(autouse=True)
def compile_from_the_second_use(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test compiles a structure's code on its second use, so any test that repeats an operation
    runs the compiled code and checks it (with the production threshold, most tests would see the
    generic loop only).  ``test_builder`` checks the threshold itself; subprocesses (examples, workers)
    run with it."""
    monkeypatch.setattr(_builder, "COMPILE_AFTER", 2)


# --------------------------------------------------------------------------------------
# Sample models
# --------------------------------------------------------------------------------------
class NytoLinear(nyto.NytoModule):
    """The seed model of issue 2, verbatim."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.Tensor([2.]))
        self.bias = torch.nn.Parameter(torch.Tensor([1.]))

    def forward(self, x: Tensor) -> Tensor:
        return self.weight * x + self.bias


class MLP(nyto.NytoModule):
    """Two Linear layers (the iris model shape), as a NytoModule."""

    def __init__(self, in_feat: int = 4, hidden: int = 6, out_feat: int = 3) -> None:
        super().__init__()
        self.layer0 = nn.Linear(in_feat, hidden)
        self.layer1 = nn.Linear(hidden, out_feat)

    def forward(self, x: Tensor) -> Tensor:
        return self.layer1(torch.relu(self.layer0(x)))


class Block(nyto.NytoModule):
    """A NytoModule used as a submodule of ``Deep``."""

    def __init__(self, width: int = 3) -> None:
        super().__init__()
        self.linear = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(torch.relu(self.linear(x)))


class Deep(nyto.NytoModule):
    """Own parameter + NytoModule submodules + a plain BatchNorm (buffers)."""

    def __init__(self, width: int = 3) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.randn(width))
        self.block0 = Block(width)
        self.block1 = Block(width)
        self.bn = nn.BatchNorm1d(width)

    def forward(self, x: Tensor) -> Tensor:
        return self.bn(self.block1(self.block0(x * self.scale)))


class TiedLM(nn.Module):
    """Embedding whose weight is tied to the output head (a shared Parameter)."""

    def __init__(self, vocab: int = 7, dim: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head(self.norm(self.embed(tokens)))


class TiedNyto(nyto.NytoModule):
    """``TiedLM`` as a NytoModule."""

    def __init__(self, vocab: int = 7, dim: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head(self.embed(tokens))


class Mixed(nn.Module):
    """Every dtype case: float32, float64, complex64, a frozen float, an integer parameter,
    plus floating, integer and bool buffers."""

    def __init__(self) -> None:
        super().__init__()
        self.w32 = nn.Parameter(torch.randn(2, 3))
        self.w64 = nn.Parameter(torch.randn(3, dtype=torch.float64))
        self.wc = nn.Parameter(torch.randn(2, dtype=torch.complex64))
        self.frozen = nn.Parameter(torch.randn(2), requires_grad=False)
        self.counts = nn.Parameter(torch.arange(4), requires_grad=False)
        self.register_buffer("stat", torch.randn(3))
        self.register_buffer("steps", torch.tensor(5))
        self.register_buffer("mask", torch.tensor([True, False, True]))

    def forward(self, x: Tensor) -> Tensor:
        return x @ self.w32 + self.stat


class MixedNyto(nyto.NytoModule):
    """``Mixed`` as a NytoModule."""

    def __init__(self) -> None:
        super().__init__()
        self.w32 = nn.Parameter(torch.randn(2, 3))
        self.w64 = nn.Parameter(torch.randn(3, dtype=torch.float64))
        self.wc = nn.Parameter(torch.randn(2, dtype=torch.complex64))
        self.frozen = nn.Parameter(torch.randn(2), requires_grad=False)
        self.counts = nn.Parameter(torch.arange(4), requires_grad=False)
        self.register_buffer("stat", torch.randn(3))
        self.register_buffer("steps", torch.tensor(5))


def conv_net() -> nn.Sequential:
    """A torchvision-style stack: Conv, BatchNorm, ReLU, Flatten, Linear (input ``[N, 1, 4, 4]``)."""
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU(), nn.Flatten(), nn.Linear(8, 3))


def embed_net() -> nn.Sequential:
    """Embedding, LayerNorm, Linear (input: integer tokens)."""
    return nn.Sequential(nn.Embedding(6, 4), nn.LayerNorm(4), nn.Linear(4, 2))


def randomize_buffers(module: nn.Module, seed: int = 0) -> nn.Module:
    """Give BatchNorm-like floating buffers non-default values (so averaging them is visible)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, buffer in module.named_buffers():
            if name.endswith("running_var"):
                buffer.copy_(torch.rand(buffer.shape, generator=generator) + 0.5)
            elif buffer.is_floating_point():
                buffer.copy_(torch.randn(buffer.shape, generator=generator))
            elif name.endswith("num_batches_tracked"):
                buffer.fill_(int(torch.randint(1, 50, (), generator=generator)))
    return module


#: Plain ``nn.Module`` factories (wrapped with ``nytorch.particle`` in the tests) and a sample input.
PLAIN_MODELS: dict[str, tuple[Callable[[], nn.Module], Callable[[], Tensor]]] = {
    "linear": (lambda: nn.Linear(3, 2), lambda: torch.randn(5, 3)),
    "conv_bn": (lambda: randomize_buffers(conv_net()), lambda: torch.randn(2, 1, 4, 4)),
    "embed": (embed_net, lambda: torch.randint(0, 6, (2, 5))),
    "tied": (TiedLM, lambda: torch.randint(0, 7, (2, 3))),
    "mixed": (lambda: Mixed(), lambda: torch.randn(4, 2)),
    "deep": (lambda: randomize_buffers(Deep()), lambda: torch.randn(4, 3)),
}

#: NytoModule factories.
NYTO_MODELS: dict[str, Callable[[], nyto.NytoModule]] = {
    "seed": NytoLinear,
    "mlp": MLP,
    "deep": lambda: randomize_buffers(Deep()),  # type: ignore[dict-item, return-value]
    "tied": TiedNyto,
    "mixed": MixedNyto,
}


@pytest.fixture(params=sorted(PLAIN_MODELS))
def plain_name(request: pytest.FixtureRequest) -> str:
    """Name of one entry of ``PLAIN_MODELS``."""
    return str(request.param)


@pytest.fixture(params=sorted(NYTO_MODELS))
def nyto_name(request: pytest.FixtureRequest) -> str:
    """Name of one entry of ``NYTO_MODELS``."""
    return str(request.param)


def make_plain(name: str, seed: int = 0) -> nn.Module:
    """A fresh instance of ``PLAIN_MODELS[name]`` built under ``seed``."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return PLAIN_MODELS[name][0]()


def make_input(name: str, seed: int = 1) -> Tensor:
    """The sample input for ``PLAIN_MODELS[name]``."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return PLAIN_MODELS[name][1]()


def make_nyto(name: str, seed: int = 0) -> nyto.NytoModule:
    """A fresh instance of ``NYTO_MODELS[name]`` built under ``seed`` (values differ per seed)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        module = NYTO_MODELS[name]()
        if name == "seed":  # fixed values; perturb so two seeds give two different models
            with torch.no_grad():
                for param in module.parameters():
                    param.add_(seed)
        return module


# --------------------------------------------------------------------------------------
# Reference helpers (plain torch)
# --------------------------------------------------------------------------------------
def is_arith(tensor: Tensor) -> bool:
    """Floating or complex: the leaves that take part in arithmetic."""
    return tensor.is_floating_point() or tensor.is_complex()


def named(module: nn.Module) -> dict[str, Tensor]:
    """``named_parameters()`` as a detached dict (the reference view of a model)."""
    return {name: param.detach() for name, param in module.named_parameters()}


def named_buffers(module: nn.Module) -> dict[str, Tensor]:
    """``named_buffers()`` as a detached dict."""
    return {name: buffer.detach() for name, buffer in module.named_buffers()}


def snapshot(module: nn.Module) -> dict[str, Any]:
    """Everything that could change: values (cloned), Parameter/buffer objects, mode, grads."""
    return {
        "values": {name: t.detach().clone() for name, t in
                   list(module.named_parameters()) + list(module.named_buffers())},
        "objects": [id(t) for t in list(module.parameters()) + list(module.buffers())],
        "modules": [id(m) for m in module.modules()],
        "training": [m.training for m in module.modules()],
        "requires_grad": [p.requires_grad for p in module.parameters()],
    }


def assert_snapshot(module: nn.Module, before: dict[str, Any]) -> None:
    """``module`` is exactly as when ``snapshot`` was taken."""
    after = snapshot(module)
    assert after["objects"] == before["objects"]
    assert after["modules"] == before["modules"]
    assert after["training"] == before["training"]
    assert after["requires_grad"] == before["requires_grad"]
    assert list(after["values"]) == list(before["values"])
    for name, value in before["values"].items():
        assert torch.equal(after["values"][name], value), name


def equal_dicts(a: dict[str, Tensor], b: dict[str, Tensor], *, exact: bool = True,
                rtol: float = 1e-5, atol: float = 1e-6) -> bool:
    """Same keys in the same order and same values (``torch.equal`` or ``allclose``), dtypes equal."""
    if list(a) != list(b):
        return False
    for key in a:
        x, y = a[key], b[key]
        if x.dtype != y.dtype or x.shape != y.shape or x.device != y.device:
            return False
        if exact:
            if not torch.equal(x, y):
                return False
        elif not torch.allclose(x, y, rtol=rtol, atol=atol, equal_nan=True):
            return False
    return True


def assert_dicts(a: dict[str, Tensor], b: dict[str, Tensor], *, exact: bool = True,
                 rtol: float = 1e-5, atol: float = 1e-6) -> None:
    """Assert ``equal_dicts`` with a helpful message."""
    assert list(a) == list(b), (list(a), list(b))
    for key in a:
        x, y = a[key], b[key]
        assert (x.dtype, tuple(x.shape), x.device) == (y.dtype, tuple(y.shape), y.device), key
        if exact:
            assert torch.equal(x, y), (key, x, y)
        else:
            assert torch.allclose(x, y, rtol=rtol, atol=atol, equal_nan=True), (key, x, y)


def ref_map(fn: Callable[..., Tensor], *dicts: dict[str, Tensor]) -> dict[str, Tensor]:
    """Per-tensor loop: ``fn`` on arithmetic leaves, the rest carried (the reference semantics)."""
    first = dicts[0]
    out = {}
    for key, value in first.items():
        out[key] = fn(value, *(d[key] for d in dicts[1:])) if is_arith(value) else value.clone()
    return out


def storages(module_or_dict: "nn.Module | dict[str, Tensor]") -> set[int]:
    """``data_ptr`` of every non-empty tensor (to check results share no storage)."""
    tensors = (module_or_dict.values() if isinstance(module_or_dict, dict)
               else list(module_or_dict.parameters()) + list(module_or_dict.buffers()))
    return {t.untyped_storage().data_ptr() for t in tensors if t.numel() > 0}


def assert_fresh_leaf_parameters(result: nn.Module, source: nn.Module) -> None:
    """Result parameters: new ``nn.Parameter`` leaves with the source's ``requires_grad``."""
    source_params = list(source.named_parameters())
    result_params = list(result.named_parameters())
    assert [n for n, _ in result_params] == [n for n, _ in source_params]
    source_ids = {id(p) for _, p in source_params}
    for (name, new), (_, old) in zip(result_params, source_params):
        assert isinstance(new, nn.Parameter), name
        assert id(new) not in source_ids, name
        assert new.is_leaf and new.grad_fn is None and new.grad is None, name
        assert new.requires_grad == old.requires_grad, name
        assert new.dtype == old.dtype and new.device == old.device and new.shape == old.shape, name


# --------------------------------------------------------------------------------------
# Hypothesis: random architectures
# --------------------------------------------------------------------------------------
# A spec is a tuple of layer descriptors; ("nested", spec) nests a GenNyto submodule.
_sizes = st.integers(min_value=1, max_value=4)
_layer = st.one_of(
    st.tuples(st.just("linear"), _sizes, _sizes, st.booleans()),
    st.tuples(st.just("conv"), _sizes, _sizes, st.integers(1, 3)),
    st.tuples(st.just("layernorm"), _sizes),
    st.tuples(st.just("batchnorm"), _sizes),
    st.tuples(st.just("embedding"), st.integers(2, 6), _sizes),
    st.tuples(st.just("tied"), st.integers(2, 5), _sizes),
)


def _specs() -> st.SearchStrategy[tuple[Any, ...]]:
    return st.recursive(
        st.lists(_layer, min_size=1, max_size=4).map(tuple),
        lambda inner: st.lists(st.one_of(_layer, inner.map(lambda s: ("nested", s))),
                               min_size=1, max_size=3).map(tuple),
        max_leaves=6,
    )


#: Strategy of architecture specs (Linear, Conv, LayerNorm, BatchNorm, Embedding, tied, nested).
architectures = _specs()


def _populate(module: nn.Module, spec: tuple[Any, ...], nyto_children: bool) -> None:
    for i, layer in enumerate(spec):
        kind = layer[0]
        name = f"{kind}{i}"
        if kind == "linear":
            child: nn.Module = nn.Linear(layer[1], layer[2], bias=layer[3])
        elif kind == "conv":
            child = nn.Conv2d(layer[1], layer[2], layer[3])
        elif kind == "layernorm":
            child = nn.LayerNorm(layer[1])
        elif kind == "batchnorm":
            child = nn.BatchNorm1d(layer[1])
        elif kind == "embedding":
            child = nn.Embedding(layer[1], layer[2])
        elif kind == "tied":
            child = nn.Module()
            child.embed = nn.Embedding(layer[1], layer[2])
            child.head = nn.Linear(layer[2], layer[1], bias=False)
            child.head.weight = child.embed.weight
        else:
            child = GenNyto(layer[1]) if nyto_children else GenPlain(layer[1])
        module.add_module(name, child)


class GenNyto(nyto.NytoModule):
    """A NytoModule built from a hypothesis architecture spec."""

    def __init__(self, spec: tuple[Any, ...]) -> None:
        super().__init__()
        _populate(self, spec, nyto_children=True)


class GenPlain(nn.Module):
    """A plain module built from a hypothesis architecture spec."""

    def __init__(self, spec: tuple[Any, ...]) -> None:
        super().__init__()
        _populate(self, spec, nyto_children=False)


def build(spec: tuple[Any, ...], seed: int, *, nyto_module: bool = True) -> nn.Module:
    """An instance of ``spec`` with parameters and floating buffers drawn under ``seed``."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        module = GenNyto(spec) if nyto_module else GenPlain(spec)
        with torch.no_grad():
            for param in module.parameters():
                param.normal_()  # LayerNorm/BatchNorm init to constants: make every leaf random
    return randomize_buffers(module, seed)


#: Scalars that keep every float32 value finite and well-conditioned.
scalars = st.floats(min_value=-4.0, max_value=4.0, allow_nan=False, allow_infinity=False).filter(
    lambda x: abs(x) > 1e-2)


def keeps_old_file(tmp_path: Any, obj: Any, error: type, message: str) -> None:
    """``nytorch.save(obj)`` raises ``error`` matching ``message``; the previous file stays, no temporary left."""
    import os

    path = tmp_path / "keep.pt"
    nyto.save({"old": torch.ones(2)}, path)
    with pytest.raises(error, match=message):
        nyto.save(obj, path)
    assert torch.equal(nyto.load(path)["old"], torch.ones(2))
    assert os.listdir(tmp_path) == ["keep.pt"]


@pytest.fixture
def world_of_one() -> Any:
    """A one-process gloo group (argument checks run before any communication)."""
    dist = torch.distributed
    if dist.is_initialized():
        pytest.skip("a process group is already initialised")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def json_close(a: Any, b: Any, rtol: float = 1e-6) -> bool:
    """Two JSON-like results (dicts, lists, numbers) equal, floats within ``rtol`` (of max(1, |a|))."""
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(json_close(a[k], b[k], rtol) for k in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(json_close(x, y, rtol) for x, y in zip(a, b))
    if isinstance(a, float) or isinstance(b, float):
        return abs(float(a) - float(b)) <= rtol * max(1.0, abs(float(a)))
    return bool(a == b)


def torch_assigns(tensor: Tensor, index: Any, value: Any) -> bool:
    """Whether plain torch takes ``copy[index] = value`` (torch 2.15 refuses an overflowing number in a
    write of more than one element, where 2.13 stores inf): the reference a swarm's item assignment follows."""
    try:
        tensor.clone()[index] = value
    except RuntimeError:
        return False
    return True


def assert_like_loop(batched: Tensor, looped: Tensor) -> None:
    """A swarm's output against a loop of its members: equal up to float rounding, not bit for bit.

    A swarm runs one batched kernel for all members where the loop runs one per member, and MKL
    chooses its GEMM kernel by shape and by the CPU's instruction set: on AVX-512 machines a batched
    ``bmm`` and the loop's ``mm`` round differently in the last bit, on AVX2 machines they agree.
    """
    assert batched.dtype == looped.dtype and batched.shape == looped.shape
    torch.testing.assert_close(batched, looped)

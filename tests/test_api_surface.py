"""The Python data model and the public surface: dunders, copies, 1.1 names, and what a user's mypy sees.

Operators nytorch does not define (``@``, ``%``, ``//``, comparisons, bitwise, ``abs``, ``round``)
must raise ``TypeError`` and leave the operands as they were; ``copy.copy`` of a result must not
lose its values when the original dies; nytorch 1.1 programs' spellings (``nytorch.mtype`` after a
bare ``import nytorch``, ``get_param_id(target_param=...)``, ``ParamProduct[Net]`` annotations)
must keep working; and the type hints must give a user's mypy the classes the operators return at
run time (``particle + swarm`` is a Swarm).
"""
from __future__ import annotations

import copy
import gc
import operator
import pickle
import pydoc
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from torch import nn

import nytorch
from nytorch import NytoModule, Particle, Swarm, merge

ROOT = Path(__file__).resolve().parents[1]


class Net(NytoModule):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 2)
        self.bn = nn.BatchNorm1d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.fc(x))


class Big(NytoModule):
    """Large enough (> 256 KiB) that results' buffers go through the result pool."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(256, 512)
        self.b = nn.Linear(512, 256)


def _tensors(x: Any) -> list[torch.Tensor]:
    if isinstance(x, nn.Module):
        return list(x.parameters()) + list(x.buffers())
    return list(x.params.values())


def _snapshot(x: Any) -> list[tuple[torch.Tensor, int, int]]:
    """Values, in-place version counters, and the Parameter objects (a model) or storage (``params`` views)."""
    module = isinstance(x, nn.Module)
    return [(t.detach().clone(), t._version, id(t) if module else t.data_ptr()) for t in _tensors(x)]


def _assert_unchanged(x: Any, before: list[tuple[torch.Tensor, int, int]]) -> None:
    after = _snapshot(x)
    assert len(after) == len(before)
    for (value, version, ident), (value2, version2, ident2) in zip(before, after):
        assert torch.equal(value, value2) and version == version2 and ident == ident2


def _operands() -> list[tuple[str, Any, Any]]:
    torch.manual_seed(0)
    net, net2 = Net(), Net()
    p, q = nytorch.particle(nn.Linear(3, 2)), nytorch.particle(nn.Linear(3, 2))
    s, s2 = Swarm.randn(nn.Linear(3, 2), 3), Swarm.randn(nn.Linear(3, 2), 3)
    return [("NytoModule", net, net2), ("Particle", p, q), ("Swarm", s, s2)]


UNSUPPORTED_BINARY: list[tuple[str, Callable[[Any, Any], Any], str]] = [
    ("@", operator.matmul, r"unsupported operand type\(s\) for @"),
    ("%", operator.mod, r"unsupported operand type\(s\) for %"),
    ("//", operator.floordiv, r"unsupported operand type\(s\) for //"),
    ("divmod", divmod, r"unsupported operand type\(s\) for divmod"),
    ("&", operator.and_, r"unsupported operand type\(s\) for &"),
    ("|", operator.or_, r"unsupported operand type\(s\) for \|"),
    ("^", operator.xor, r"unsupported operand type\(s\) for \^"),
    ("<<", operator.lshift, r"unsupported operand type\(s\) for <<"),
    ("<", operator.lt, r"'<' not supported"),
    ("<=", operator.le, r"'<=' not supported"),
    (">", operator.gt, r"'>' not supported"),
    (">=", operator.ge, r"'>=' not supported"),
]


@pytest.mark.parametrize("symbol, op, message", UNSUPPORTED_BINARY, ids=[s for s, _, _ in UNSUPPORTED_BINARY])
def test_unsupported_binary_operators_raise_type_error_and_change_nothing(symbol: str, op: Callable, message: str) -> None:
    for kind, x, y in _operands():
        # ``tensor @ swarm`` is the weighted sum of members (tested in test_swarm): only x on the left there
        others = [y, 2, 0.5, torch.tensor(2.0)]
        for other in others:
            pairs = [(x, other)] if (symbol == "@" and kind == "Swarm") else [(x, other), (other, x)]
            for left, right in pairs:
                before_x, before_y = _snapshot(x), _snapshot(y)
                with pytest.raises(TypeError, match=message):
                    op(left, right)
                _assert_unchanged(x, before_x)
                _assert_unchanged(y, before_y)


@pytest.mark.parametrize("name, fn, message", [
    ("abs", abs, r"bad operand type for abs\(\)"),
    ("~", operator.invert, r"bad operand type for unary ~"),
    ("round", round, r"doesn't define __round__"),
    ("float", float, r"float\(\) argument must be"),
    ("int", int, r"int\(\) argument must be"),
])
def test_unsupported_unary_operators_raise_type_error(name: str, fn: Callable, message: str) -> None:
    for _, x, _ in _operands():
        before = _snapshot(x)
        with pytest.raises(TypeError, match=message):
            fn(x)
        _assert_unchanged(x, before)


@pytest.mark.parametrize("op", [operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ipow])
def test_in_place_operators_with_wrong_types_raise_and_change_nothing(op: Callable) -> None:
    name = {"iadd": "add", "isub": "sub", "imul": "mul", "itruediv": "div", "ipow": "pow"}[op.__name__]
    for kind, x, _ in _operands():
        # (a 1-D tensor is a Swarm's per-member weights: a wrong length is a StructureError, in test_swarm)
        for bad in ["a", None, [1.0], {}, (1,), object()] + ([] if kind == "Swarm" else [torch.ones(5)]):
            before = _snapshot(x)
            with pytest.raises(TypeError, match=rf"^{name}: expected .*got {type(bad).__name__}"):
                op(x, bad)
            _assert_unchanged(x, before)
    for kind, x, _ in _operands()[:2]:  # a single model or Particle cannot take a whole Swarm in place
        swarm = Swarm.randn(x if isinstance(x, nn.Module) else x.module(), 2)
        before = _snapshot(x)
        with pytest.raises(TypeError, match=rf"^{name}: cannot write a Swarm into a single .* in place"):
            op(x, swarm)
        _assert_unchanged(x, before)


def test_bool_len_hash_eq_iteration_and_containment() -> None:
    (_, net, net2), (_, p, q), (_, s, s2) = _operands()
    # identity semantics, as nn.Module: == compares objects, hash is usable (sets, dict keys)
    for x, y in [(net, net2), (p, q), (s, s2)]:
        assert x == x and x != y and not (x == x.clone())
        assert len({x, y, x}) == 2 and hash(x) == hash(x)
        assert bool(x) is True
    assert len(p) == len(dict(nn.Linear(3, 2).named_parameters())) == 2
    assert len(nytorch.particle(nn.BatchNorm1d(2), buffers=True)) == 5  # 2 parameters + 3 buffers
    assert len(s) == 3 and [type(m) for m in s] == [Particle] * 3
    for x in (net, p):  # a model or a Particle is one value, not a container
        with pytest.raises(TypeError, match="not iterable"):
            iter(x)
        with pytest.raises(TypeError, match="not iterable"):
            "fc.weight" in x  # noqa: B015
    with pytest.raises(TypeError, match="has no len"):
        len(net)
    assert isinstance(net, nn.Module) and isinstance(net + 1, Net) and type(net + 1) is Net
    assert isinstance(p, nytorch.ParamProduct) and not isinstance(p, nn.Module)


def test_repr_is_short_even_for_big_models() -> None:
    big = nn.Sequential(nn.Linear(1024, 1024), nn.Linear(1024, 1024))
    p = nytorch.particle(big)
    assert repr(p) == str(p) == "Particle(Sequential, 4 tensors, 2099200 values)"
    assert repr(Swarm.zeros(nn.Linear(3, 2), 4)) == "Swarm(Linear, 4 members, 2 tensors, 8 values each)"
    assert repr(merge.EMA(nn.Linear(3, 2), decay=0.9)) == "EMA(Linear, step=0, buffers='average')"
    assert repr(nytorch.ParamConfig(operational=False)) == "ParamConfig(operational=False, clone=True)"
    assert "tensor(" not in repr(Net() + 1)  # a NytoModule result prints as nn.Module does
    for obj in (p, Swarm.zeros(nn.Linear(3, 2), 2), merge.EMA(nn.Linear(3, 2)), Net() + 1, nytorch):
        assert pydoc.render_doc(obj)  # help() works, pending results included


def test_copy_of_a_result_keeps_its_values_after_the_original_dies() -> None:
    """``copy.copy(p + 1)`` used to share the result's unseen buffers: when ``p + 1`` died they went to
    the result pool and the next result overwrote the copy's values."""
    old = nytorch.set_result_pool(64 << 20)
    try:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(256, 512), nn.Linear(512, 256))  # 1 MiB: pooled
        p = nytorch.particle(model)
        expected = {name: param.detach() + 1 for name, param in model.named_parameters()}  # per tensor
        result = p + 1
        shallow = copy.copy(result)
        del result
        gc.collect()
        churn = [p * 3 for _ in range(4)]  # results that would reuse pooled buffers
        for name, value in expected.items():
            assert torch.equal(shallow.params[name], value), name
        del churn
        # a shallow copy views the same tensors (as copy.copy of a module shares its Parameters)
        result = p + 1
        shallow = copy.copy(result)
        shallow += 1
        assert torch.equal(result.params["0.bias"], expected["0.bias"] + 1)
        # deep copies and pickles are independent
        result = p + 1
        deep, pickled = copy.deepcopy(result), pickle.loads(pickle.dumps(result))
        del result
        gc.collect()
        churn = [p * 5 for _ in range(4)]
        for name, value in expected.items():
            assert torch.equal(deep.params[name], value) and torch.equal(pickled.params[name], value), name
        # NytoModule results: copy.copy builds the pending result first
        torch.manual_seed(1)
        net = Big()
        expected = {name: param.detach() + 1 for name, param in net.named_parameters()}
        result = net + 1
        shallow_net = copy.copy(result)
        del result
        gc.collect()
        churn = [net * 3 for _ in range(4)]
        for name, param in shallow_net.named_parameters():
            assert torch.equal(param, expected[name]), name
        del churn
    finally:
        nytorch.set_result_pool(old)


def test_nytorch_11_module_paths_load_with_import_nytorch() -> None:
    """1.1's ``import nytorch`` loaded ``nytorch.mtype`` and ``nytorch.module``; 1.1 code reads them as attributes."""
    code = textwrap.dedent("""
        import nytorch as nyto
        config = nyto.mtype.ParamConfig(operational=False)
        assert config.operational is False and nyto.mtype.ParamConfig is nyto.ParamConfig
        assert nyto.module.NytoModule is nyto.NytoModule and nyto.module.ParamProduct is nyto.Particle
        assert nyto.mtype.ParamID is int
        print("ok")
    """)
    env_path = str(ROOT)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**_env(), "PYTHONPATH": env_path}, cwd="/")
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def _env() -> dict[str, str]:
    import os
    return {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}


def test_get_param_id_takes_11s_keyword() -> None:
    net = Net()
    reference = [id(param) for param in net.parameters()]
    assert net.get_param_id(target_param=net.fc.bias) == reference.index(id(net.fc.bias)) == 1
    assert net.get_param_id(net.bn.weight) == reference.index(id(net.bn.weight)) == 2
    with pytest.raises(ValueError, match=r"get_param_id: the given parameter \(\(2,\)\) is not a parameter of this Net"):
        net.get_param_id(target_param=nn.Parameter(torch.ones(2)))


def test_param_product_is_subscriptable_as_in_11() -> None:
    """1.1's ``ParamProduct`` was ``Generic``: ``def f(pp: ParamProduct[Net])`` is evaluated at definition."""
    from nytorch.module import ParamProduct

    def double(pp: ParamProduct[Net]) -> ParamProduct[Net]:
        return pp * 2

    net = Net()
    result = double(net.product())
    for name, param in net.named_parameters():
        assert torch.equal(result.params[name], param.detach() * 2), name
    assert ParamProduct[Net].__origin__ is Particle and ParamProduct[Net].__args__ == (Net,)


def test_particle_or_model_with_a_swarm_is_a_swarm_at_run_time() -> None:
    """What the type hints below promise: ``x op swarm`` reaches the Swarm's reflected operator."""
    torch.manual_seed(0)
    linear = nn.Linear(3, 2)
    p, swarm = nytorch.particle(linear), Swarm.randn(nn.Linear(3, 2), 3)
    for op in (operator.add, operator.sub, operator.mul, operator.truediv):
        result = op(p, swarm)
        assert type(result) is Swarm and len(result) == 3
        for i in range(3):
            for name, value in linear.named_parameters():
                assert torch.allclose(result[i].params[name], op(value.detach(), swarm[i].params[name])), (op, name)
    assert type(p ** Swarm.rand(nn.Linear(3, 2), 2)) is Swarm


USER_SCRIPT = '''
import torch
from torch import nn
import nytorch as nyto
from nytorch import NytoModule, Particle, Swarm


class Net(NytoModule):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 2)


net = Net()
p = nyto.particle(nn.Linear(3, 2))
s = Swarm.stack([nn.Linear(3, 2), nn.Linear(3, 2)])
reveal_type(net + net)
reveal_type(0.9 * (net - net) + net)
reveal_type(net.clone())
reveal_type(p)
reveal_type(p + p)
reveal_type(2 * p)
reveal_type(p + s)
reveal_type(p * s)
reveal_type(net - s)
reveal_type(s + p)
reveal_type(s[0])
reveal_type(s[1:])
reveal_type(s[[0, 1]])
moved: Swarm = (0.5 * p + s).mean() + s
q: Particle = p
q += s
'''

LINEAR_PARTICLE = "nytorch._particle.Particle[torch.nn.modules.linear.Linear]"
#: a Swarm's members are of one class, which the Swarm type does not carry
MODULE_PARTICLE = "nytorch._particle.Particle[torch.nn.modules.module.Module]"
EXPECTED_TYPES = [
    "user.Net", "user.Net", "user.Net", LINEAR_PARTICLE, LINEAR_PARTICLE, LINEAR_PARTICLE,
    "nytorch._swarm.Swarm", "nytorch._swarm.Swarm", "nytorch._swarm.Swarm",
    "nytorch._swarm.Swarm", MODULE_PARTICLE, "nytorch._swarm.Swarm", "nytorch._swarm.Swarm",
]


def _users_mypy(tmp_path: Path, script: str, *flags: str) -> tuple[list[str], list[str], str]:
    """What mypy says of a user's ``script``: (revealed types, error lines, the whole output)."""
    pytest.importorskip("mypy")
    path = tmp_path / "user.py"
    path.write_text(script)
    done = subprocess.run([sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml"),
                           "--cache-dir", str(ROOT / ".mypy_cache"), "--no-error-summary", *flags, str(path)],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    lines = done.stdout.splitlines()
    # mypy before 2.0 spells builtins in full (``builtins.dict[builtins.str, ...]``)
    revealed = [line.split('Revealed type is "')[1].rstrip('"').replace("builtins.", "")
                for line in lines if "Revealed type is" in line]
    # nytorch's own files are read from this checkout, so mypy may report in them too (``make test`` runs
    # mypy on them); a user's mypy reads an installed (py.typed) nytorch and reports in their files only
    return revealed, [line for line in lines if ": error:" in line and "user.py:" in line], done.stdout


@pytest.mark.slow  # mypy reads torch's stubs: ~20 s of CPU with a cold cache (make test's mypy run reuses it)
def test_a_users_mypy_sees_the_classes_operators_return(tmp_path: Path) -> None:
    revealed, errors, output = _users_mypy(tmp_path, USER_SCRIPT)
    assert revealed == EXPECTED_TYPES, output
    # the one error is the real one: ``q += s`` raises TypeError at run time
    line = USER_SCRIPT.splitlines().index("q += s") + 1
    assert len(errors) == 1 and f"user.py:{line}: error: Result type of + incompatible" in errors[0], output


#: A user's program under ``mypy --strict``: what goes in comes back typed as it went in (a model's class, a
#: dict of tensors), 1.1's ``ParamProduct[Net]`` annotation, ``nytorch.mtype`` reached from ``import nytorch``.
STRICT_SCRIPT = '''
import torch
from torch import Tensor, nn
import nytorch
import nytorch.functional as nf
from nytorch import NytoModule, Swarm, merge
from nytorch import algorithms as alg
from nytorch.module import ParamProduct


class Net(NytoModule):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(2, 2)


def double(pp: ParamProduct[Net]) -> ParamProduct[Net]:
    return pp * 2


def sgd(p: dict[str, Tensor], g: dict[str, Tensor]) -> dict[str, Tensor]:
    return nf.sub(p, nf.mul(0.1, g))


def width(m: Net) -> int:
    return m.fc.out_features


lin = nn.Linear(2, 2)
net: Net = double(Net().product()).module()
drawn: nn.Linear = nytorch.particle(lin).randn().module()
written: nn.Linear = nytorch.particle(lin).copy_to(lin)
packed: nn.Linear = nytorch.flatten_(nn.Linear(2, 2))
bound: nn.Linear = nf.bind(lin, nf.params(lin))
config = nytorch.mtype.ParamConfig(operational=False)
swarm = Swarm.stack([nn.Linear(2, 2), nn.Linear(2, 2)])
noise = alg.es_noise(Net(), 4)
ema = merge.EMA(lin)
reveal_type(nytorch.particle(lin))
reveal_type(nf.add(nf.params(lin), 1))
reveal_type(nf.randn_like([torch.zeros(2)]))
reveal_type(nf.lerp(nf.params(lin), nf.params(lin), 0.5))
reveal_type(merge.average(swarm))
reveal_type(merge.average([lin, lin]))
reveal_type(merge.greedy_soup(swarm, lambda m: 0.0))
reveal_type(ema.averaged)
reveal_type(ema.copy_to())
reveal_type(alg.es_step(Net(), noise, torch.zeros(4), sigma=0.1, lr=0.1))
reveal_type(alg.es_step(swarm, noise, torch.zeros(4), sigma=0.1, lr=0.1))
reveal_type(alg.es_step(lin, noise, torch.zeros(4), sigma=0.1, lr=0.1))
'''

PARAMS = "dict[str, torch._tensor.Tensor]"
STRICT_TYPES = [
    LINEAR_PARTICLE, PARAMS, "list[torch._tensor.Tensor]", PARAMS, MODULE_PARTICLE, "torch.nn.modules.linear.Linear",
    "tuple[Any, list[int], float, fallback=nytorch.merge._average.Soup]",
    "torch.nn.modules.linear.Linear", "torch.nn.modules.linear.Linear", "user.Net", "nytorch._swarm.Swarm",
    MODULE_PARTICLE,
]


@pytest.mark.slow  # as above
def test_a_users_strict_mypy_gets_back_the_types_it_passed_in(tmp_path: Path) -> None:
    revealed, errors, output = _users_mypy(tmp_path, STRICT_SCRIPT, "--strict")
    assert not errors, output
    assert revealed == STRICT_TYPES, output


def test_functional_call_names_a_particle_passed_as_params() -> None:
    """``nf.call(model, particle, x)`` used to fail with "'Particle' object is not iterable"."""
    import nytorch.functional as nf

    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    p = nytorch.particle(model) * 2
    x = torch.randn(4, 3)
    for params in (p, Swarm.zeros(model, 2)):
        with pytest.raises(TypeError, match=rf"^call: expected a mapping from names to tensors as params, "
                                            rf"got {type(params).__name__} \(pass its \.params\)$"):
            nf.call(model, params, x)
    with pytest.raises(TypeError, match=r"^call: expected a mapping from names to tensors as params, got int$"):
        nf.call(model, 3, x)
    expected = x @ (2 * model.weight.detach()).T + 2 * model.bias.detach()  # plain torch
    assert torch.allclose(nf.call(model, p.params, x), expected)
    assert torch.allclose(nf.call(model, list(p.params.items()), x), expected)  # what dict() takes still works


class _SetattrWrapper(NytoModule):
    """Attribute assignment through nn.Module's own hook (logging / freezing wrappers do this)."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(2, 2)

    def __setattr__(self, name: str, value: Any) -> None:
        nn.Module.__setattr__(self, name, value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)


class _GetattrWrapper(NytoModule):
    """Attribute delegation that calls ``nn.Module.__getattr__`` directly instead of ``super()``."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(2, 2)

    def __getattr__(self, name: str) -> Any:
        if name in ("in_features", "out_features"):
            return getattr(self.inner, name)
        return nn.Module.__getattr__(self, name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)


def test_results_of_classes_with_their_own_attribute_hooks_behave_as_built_at_once() -> None:
    """A result's module tree is built on first touch through NytoModule's hooks; a subclass that
    reaches ``nn.Module``'s hooks directly used to see the unbuilt result (an assignment was lost,
    a submodule assignment raised, a call raised AttributeError)."""
    torch.manual_seed(0)
    x = torch.randn(4, 2)
    wrapper = _SetattrWrapper()
    result = wrapper + 1
    result.tag = "kept"
    expected = x @ (wrapper.inner.weight.detach() + 1).T + (wrapper.inner.bias.detach() + 1)  # plain torch
    assert torch.allclose(result(x), expected)
    assert result.tag == "kept"
    result = wrapper * 2
    result.inner = nn.Linear(2, 3)  # raised "cannot assign module before Module.__init__() call"
    assert result.inner.weight.shape == (3, 2)

    delegating = _GetattrWrapper()
    result = delegating - 1
    assert result.in_features == 2
    expected = x @ (delegating.inner.weight.detach() - 1).T + (delegating.inner.bias.detach() - 1)
    assert torch.allclose(result(x), expected)
    assert [name for name, _ in result.named_parameters()] == ["inner.weight", "inner.bias"]

    class Child(_GetattrWrapper):  # inherits the parent's hook
        pass

    assert torch.allclose((Child() + 0).in_features * torch.ones(1), torch.full((1,), 2.0))
    assert Net._nyto_builds_on_touch and not Child._nyto_builds_on_touch  # plain subclasses stay lazy


def test_param_config_equality_is_the_11_dataclass_s() -> None:
    """1.1's ``@dataclass ParamConfig`` compared its fields only; custom attributes do not count."""
    tagged = nytorch.ParamConfig()
    tagged.is_weight = True
    assert tagged == nytorch.ParamConfig() and not (tagged != nytorch.ParamConfig())
    assert tagged != nytorch.ParamConfig(operational=False) and tagged != nytorch.ParamConfig(clone=False)
    assert nytorch.ParamConfig(False, False) == nytorch.ParamConfig(operational=False, clone=False, tag="x")
    assert (tagged == 1) is False and (tagged == (True, True)) is False
    with pytest.raises(TypeError, match="unhashable type: 'ParamConfig'"):
        hash(tagged)  # mutable, as the dataclass

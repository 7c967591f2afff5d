"""Every public name has a docstring with a runnable ``>>>`` example.

The public API is enumerated, not listed by hand: everything in the ``__all__`` of
``nytorch``, ``nytorch.functional``, ``nytorch.merge``, ``nytorch.algorithms`` and
``nytorch.distributed`` (when present), plus the public methods and properties of the
public classes ``Particle``, ``NytoModule``, ``Swarm``, ``ParamConfig`` and ``merge.EMA``
(members inherited unchanged from ``torch.nn.Module`` or ``object`` are PyTorch's to
document; overrides are ours).  The examples themselves run as doctests
(``python -m pytest --doctest-modules nytorch``); this file checks that they exist.
"""
from __future__ import annotations

import functools
import importlib
import inspect
import types
import typing
from collections.abc import Iterator
from typing import Any

import pytest
from torch import nn

import nytorch

PACKAGES = ["nytorch", "nytorch.functional", "nytorch.merge", "nytorch.algorithms", "nytorch.distributed"]
OPTIONAL = {"nytorch.distributed"}
CLASSES = [nytorch.Particle, nytorch.NytoModule, nytorch.Swarm, nytorch.ParamConfig, nytorch.merge.EMA]
#: Classes whose members are someone else's API (inherited unchanged, not checked here).
FOREIGN = (nn.Module, object)


def _modules() -> list[types.ModuleType]:
    found = []
    for name in PACKAGES:
        try:
            found.append(importlib.import_module(name))
        except ImportError:
            if name not in OPTIONAL:
                raise
    return found


def _is_alias(value: Any) -> bool:
    """A typing alias such as ``Callable[[int], float]``: it cannot carry a docstring."""
    return typing.get_origin(value) is not None or isinstance(value, typing.TypeVar)


def _public_names() -> Iterator[tuple[str, Any]]:
    for module in _modules():
        assert hasattr(module, "__all__"), f"{module.__name__} has no __all__"
        yield module.__name__, module
        for name in module.__all__:
            yield f"{module.__name__}.{name}", getattr(module, name)


def _members(cls: type) -> Iterator[tuple[str, Any]]:
    """Public methods, class/static methods and properties of ``cls`` defined in nytorch."""
    seen: set[str] = set()
    for klass in cls.__mro__:
        if klass in FOREIGN or not klass.__module__.startswith("nytorch"):
            continue
        for name, value in vars(klass).items():
            if name.startswith("_") or name in seen:
                continue
            seen.add(name)
            if isinstance(value, (staticmethod, classmethod)):
                value = value.__func__
            elif isinstance(value, property):
                value = value.fget
            elif isinstance(value, functools.cached_property):
                value = value.func
            if inspect.isfunction(value):
                yield f"{cls.__name__}.{name}", value


def _doc(value: Any) -> str:
    """The docstring written for ``value`` itself (a class must not just inherit one)."""
    if inspect.isclass(value):
        return value.__dict__.get("__doc__") or ""
    return (value.__doc__ if isinstance(value, types.ModuleType) else inspect.getdoc(value)) or ""


def _alias_comment(module: types.ModuleType, alias: str) -> str:
    """The ``#:`` comment above ``alias = ...`` in ``module`` or one of its submodules ('' if none)."""
    candidates = [module] + [v for v in vars(module).values()
                             if isinstance(v, types.ModuleType) and v.__name__.startswith(module.__name__ + ".")]
    for candidate in candidates:
        try:
            source = "\n" + inspect.getsource(candidate)
        except (OSError, TypeError):
            continue
        if f"\n{alias} = " in source:
            return source.split(f"\n{alias} = ", 1)[0].rsplit("\n", 1)[-1]
    return ""


NAMES = sorted(dict(_public_names()).items())
MEMBERS = sorted({name: member for cls in CLASSES for name, member in _members(cls)}.items())


def test_the_api_is_enumerated() -> None:
    names = {name for name, _ in NAMES}
    members = {name for name, _ in MEMBERS}
    assert {"nytorch.Swarm", "nytorch.merge.ema_", "nytorch.algorithms.pso_step", "nytorch.functional.bind"} <= names
    assert {"Swarm.grad_and_value", "Particle.lerp_", "EMA.update", "NytoModule.product"} <= members
    assert "NytoModule.parameters" not in members and "NytoModule.state_dict" not in members


@pytest.mark.parametrize("name, value", NAMES, ids=[name for name, _ in NAMES])
def test_public_name_has_an_example(name: str, value: Any) -> None:
    module_name, _, attribute = name.rpartition(".")
    if _is_alias(value):  # type aliases are documented by a `#:` comment above their definition
        comment = _alias_comment(importlib.import_module(module_name), attribute)
        assert comment.startswith("#:"), f"{name}: document the type alias with a `#:` comment above it"
        return
    doc = _doc(value)
    assert doc.strip(), f"{name} has no docstring"
    assert ">>>" in doc, f"{name}: the docstring has no runnable `>>>` example"


@pytest.mark.parametrize("name, member", MEMBERS, ids=[name for name, _ in MEMBERS])
def test_public_member_has_an_example(name: str, member: Any) -> None:
    doc = _doc(member)
    assert doc.strip(), f"{name} has no docstring"
    assert ">>>" in doc, f"{name}: the docstring has no runnable `>>>` example"

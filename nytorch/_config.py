"""``ParamConfig``: which parameters take part in particle operations.

Configs live in a plain dict on each ``NytoModule`` (attribute ``_nyto_param_configs``),
keyed by parameter path relative to that module, and stored in the deepest
``NytoModule`` that owns the parameter.  Modules built from one another by
particle operations share that dict, so a config set on one applies to all
(the "species" rule of nytorch 1.1) without any pointer back to a root module.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Set as AbstractSet
from typing import TYPE_CHECKING, Any, Optional

from torch import nn

from ._walk import CONFIG_ATTR, Layout, realized

__all__ = ["ParamConfig", "CONFIG_ATTR", "configs_for", "configs_in_scope", "copy_tables"]


@dataclasses.dataclass(init=False, repr=False, eq=False)
class ParamConfig:
    """How one parameter behaves in particle operations (nytorch 1.1 compatible).

    Attributes:
        operational: ``True`` to take part in arithmetic; ``False`` leaves it out.
        clone: for a non-operational parameter, ``True`` gives results a clone of it and
            ``False`` gives results the very same ``Parameter`` object.

    Any other attribute may be set and read by custom operators (e.g. ``is_weight``).
    As in 1.1 it is a dataclass whose fields are ``operational`` and ``clone``
    (``dataclasses.asdict`` / ``replace`` and ``==`` use them; custom attributes are not fields).

    >>> import dataclasses
    >>> config = ParamConfig()
    >>> config.is_weight = True
    >>> config
    ParamConfig(operational=True, clone=True, is_weight=True)
    >>> dataclasses.replace(config, clone=False)
    ParamConfig(operational=True, clone=False)
    """

    operational: bool
    clone: bool

    def __init__(self, operational: bool = True, clone: bool = True, **extra: Any) -> None:
        self.operational = operational
        self.clone = clone
        self.__dict__.update(extra)

    if TYPE_CHECKING:  # custom attributes (``config.is_weight = True``) type-check too
        def __getattr__(self, name: str) -> Any: ...

        def __setattr__(self, name: str, value: Any) -> None: ...

    def __repr__(self) -> str:
        fields = ", ".join(f"{key}={value!r}" for key, value in self.__dict__.items())
        return f"ParamConfig({fields})"

    def __eq__(self, other: object) -> bool:
        # as the 1.1 dataclass: the fields decide, custom attributes (``is_weight``) do not
        if not isinstance(other, ParamConfig):
            return NotImplemented
        return (self.operational, self.clone) == (other.operational, other.clone)

    __hash__ = None  # type: ignore[assignment]  # mutable, like the dataclass it replaces

    def copy(self) -> "ParamConfig":
        """An independent copy with every attribute (custom ones too).

        Returns:
            A new ``ParamConfig`` (attribute values themselves are not copied).

        >>> ParamConfig(operational=False).copy()
        ParamConfig(operational=False, clone=True)
        """
        return ParamConfig(**self.__dict__)


DEFAULT = ParamConfig()


def _tables(layout: Layout) -> list[tuple[str, dict[str, ParamConfig]]]:
    found = [(prefix, table) for prefix, table, _ in layout.tables if table]
    found.sort(key=lambda item: len(item[0]), reverse=True)  # deepest owner first
    return found


def configs_for(layout: Layout, names: Optional[Iterable[str]] = None) -> Optional[list[ParamConfig]]:
    """The config of every parameter (``None`` when every parameter has the default)."""
    owners = layout.tables
    if not owners or (len(owners) == 1 and not owners[0][1]):  # none, or a NytoModule root's own, still empty
        return None
    tables = _tables(layout)
    if not tables:
        return None
    result = []
    for name in layout.names if names is None else names:
        for prefix, table in tables:
            if name.startswith(prefix):
                config = table.get(name[len(prefix):])
                if config is not None:
                    result.append(config)
                    break
        else:
            result.append(DEFAULT)
    return result


def configs_in_scope(layout: Layout, scope: str,
                     names: Optional[AbstractSet[str]] = None) -> list[tuple[int, ParamConfig]]:
    """``(param_id, config)`` for every parameter under ``scope`` (a dotted prefix; ``""`` for all).

    ``names``, when given, further keeps only those parameter names (``layout.names`` spelling).
    Configs are created on first use and stored in the deepest config-holding module on the path.
    """
    owners = [(prefix, table) for prefix, table, _ in layout.tables]
    owners.sort(key=lambda item: len(item[0]), reverse=True)
    pairs = []
    for index, name in enumerate(layout.names):
        if scope and not (name == scope or name.startswith(scope + ".")):
            continue
        if names is not None and name not in names:
            continue
        for prefix, table in owners:
            if name.startswith(prefix):
                local = name[len(prefix):]
                config = table.get(local)
                if config is None:
                    config = table[local] = ParamConfig()
                pairs.append((index, config))
                break
    return pairs


def copy_tables(root: nn.Module) -> None:
    """Give every module under ``root`` its own copies of its configs (a new "species")."""
    for module in realized(root).modules():  # the root's own table is read from its ``__dict__``
        table = module.__dict__.get(CONFIG_ATTR)
        if table is not None:
            module.__dict__[CONFIG_ATTR] = {key: value.copy() for key, value in table.items()}

"""nytorch 1.1's ``nytorch.mtype`` import path, kept so that 1.1 code imports unchanged.

New code imports from ``nytorch`` (``nytorch.ParamConfig``); the aliases are 1.1's own.

>>> from nytorch.mtype import ParamConfig
>>> ParamConfig(operational=False).operational
False
"""
from torch import nn

from ._config import ParamConfig

#: A parameter's id (see ``NytoModule.get_param_id``).
ParamID = int
#: A module's id in 1.1's version manager (kept as a name only).
ModuleID = int
#: What 1.1 called a parameter and a module.
ParamType = nn.Parameter
Module = nn.Module

__all__ = ["ParamConfig", "ParamID", "ModuleID", "ParamType", "Module"]

"""nytorch 1.1's ``nytorch.module`` import path, kept so that 1.1 code imports unchanged.

New code imports from ``nytorch`` (``nytorch.NytoModule``, ``nytorch.Particle``).

>>> from nytorch.module import NytoModule, ParamProduct
>>> import nytorch
>>> NytoModule is nytorch.NytoModule and ParamProduct is nytorch.ParamProduct
True
"""
from . import ParamProduct
from ._module import NytoModule

__all__ = ["NytoModule", "ParamProduct"]

"""nytorch: arithmetic on whole PyTorch models.

>>> import torch, nytorch
>>> net = torch.nn.Linear(2, 1)
>>> p = nytorch.particle(net)
>>> ema = p.clone()
>>> _ = ema.lerp_(p.randn(), 0.01)
"""
from . import functional
from ._config import ParamConfig
from ._errors import DeviceMismatchError, StructureError
from ._module import NytoModule
from ._particle import Particle, particle

#: nytorch 1.1 name of ``Particle``.
ParamProduct = Particle

__version__ = "2.0.0.dev0"

__all__ = [
    "NytoModule", "Particle", "ParamProduct", "particle", "ParamConfig",
    "StructureError", "DeviceMismatchError", "functional",
]

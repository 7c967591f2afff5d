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
from ._swarm import Swarm
from . import algorithms, distributed, merge
from ._packing import flatten_
from ._pool import set_result_pool
from ._checkpoint import load, save
from ._codec import CheckpointError
from ._rng import get_rng_state, set_rng_state
from ._structure import check_structure, same_structure

#: nytorch 1.1 name of ``Particle``.
ParamProduct = Particle

# 1.1's own module paths, loaded by ``import nytorch`` as 1.1 did (``nytorch.mtype.ParamConfig``), and
# imported by name so type checkers see them; they stay out of ``__all__`` (``from nytorch import *``
# binds no ``module``)
from . import module as module, mtype as mtype  # noqa: E402
_PATHS_11 = (module, mtype)  # used: the import above is for these attributes of the package

__version__ = "2.0.0.dev0"

__all__ = [
    "NytoModule", "Particle", "ParamProduct", "particle", "ParamConfig", "Swarm", "flatten_",
    "StructureError", "DeviceMismatchError", "functional", "algorithms", "distributed", "merge",
    "save", "load", "CheckpointError", "get_rng_state", "set_rng_state", "set_result_pool",
    "check_structure", "same_structure",
]

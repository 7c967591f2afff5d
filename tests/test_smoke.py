import torch

import nytorch


def test_seed_add_scalar_values():
    net = torch.nn.Linear(1, 1)
    out = (nytorch.particle(net) + 10).module()
    assert torch.equal(out.weight, net.weight + 10)

# %% [markdown]
# # 01 · Quickstart: arithmetic on whole models
#
# nytorch lets you write `w = 0.9 * w + 0.1 * v` for whole PyTorch models. This notebook walks
# through the three ways to do it: subclassing `NytoModule`, wrapping any model with
# `nytorch.particle`, and pure functions on parameter pytrees (`nytorch.functional`).

# %%
import torch
import nytorch as nyto
import nytorch.functional as nf

_ = torch.manual_seed(0)

# %% [markdown]
# ## Subclass `NytoModule`
# Change `nn.Module` to `nytorch.NytoModule`; everything else stays a normal PyTorch model.

# %%
class NytoLinear(nyto.NytoModule):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.Tensor([2.]))
        self.bias = torch.nn.Parameter(torch.Tensor([1.]))

    def forward(self, x):
        return self.weight * x + self.bias


net = NytoLinear()
net2 = net + 10            # a new NytoLinear: every parameter + 10
x = torch.arange(4)
print("net(x) =", net(x))
print("net2(x) =", net2(x))
print("net2.weight =", net2.weight.data, " net.weight is unchanged:", net.weight.data)

# %% [markdown]
# Models combine parameter by parameter:

# %%
net3 = net + net2
print(net3.weight.data, net3.bias.data)

# %% [markdown]
# `randn()` gives the same structure with N(0, 1) values; `clone()` copies values into fresh Parameters.

# %%
random_net = net.randn()
copy = net.clone()
print("randn:", random_net.weight.data, random_net.bias.data)
print("clone is a new Parameter:", copy.weight is not net.weight, "with equal values:", torch.equal(copy.weight, net.weight))

# %% [markdown]
# Results are ordinary models: fresh leaf Parameters that train like any other.

# %%
optimizer = torch.optim.SGD(net3.parameters(), lr=0.1)
loss = (net3(x.float()) - 1).pow(2).mean()
loss.backward()
optimizer.step()
print("trained net3.weight:", net3.weight.data)

# %% [markdown]
# ## Wrap any model: `nytorch.particle`
# No subclassing: a `Particle` views the parameters of any `nn.Module`.

# %%
mlp = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
other = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
p, q = nyto.particle(mlp), nyto.particle(other)
average = (p + q) / 2
print(average)
soup = average.module()          # a fresh nn.Sequential
print(type(soup).__name__, torch.allclose(soup[0].weight, (mlp[0].weight + other[0].weight) / 2))

# %% [markdown]
# ## Functional style: pytrees of tensors
# `nf.params` gives a `dict[str, Tensor]`; every function is pure and works inside `torch.func`.

# %%
params = nf.params(mlp)
noisy = nf.add(params, nf.mul(0.01, nf.randn_like(params)))
out = nf.call(mlp, noisy, torch.ones(2, 4))
print({name: tuple(t.shape) for name, t in params.items()})
print("output with noisy parameters:", out.shape, " distance:", nf.norm(nf.sub(noisy, params)).item())

# %% [markdown]
# Because the functional ops are differentiable and `vmap`-friendly, you can, for instance,
# take per-sample gradients with respect to an interpolation weight between two models:

# %%
from torch.func import grad, vmap

inputs, targets = torch.randn(5, 4), torch.randint(0, 3, (5,))
start, end = nf.params(mlp), nf.params(other)

def loss_at(weight, x, y):
    mixed = nf.lerp(start, end, weight)
    logits = nf.call(mlp, mixed, x.unsqueeze(0))
    return torch.nn.functional.cross_entropy(logits, y.unsqueeze(0))

print(vmap(grad(loss_at), in_dims=(None, 0, 0))(torch.tensor(0.3), inputs, targets))

# %% [markdown]
# ## Mismatched models fail loudly
# Models combine when parameter names, shapes and dtypes match. Otherwise you get a
# `StructureError` (a `ValueError`) naming the first parameter that differs, and nothing is modified.

# %%
wide = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
try:
    p + nyto.particle(wide)
except nyto.StructureError as error:
    print(type(error).__name__, ":", error)

try:
    net + "ten"
except TypeError as error:
    print(type(error).__name__, ":", error)

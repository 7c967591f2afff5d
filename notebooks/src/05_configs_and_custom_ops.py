# %% [markdown]
# # 05 · Freezing parts of a model, custom operators, and migrating from nytorch 1.1
#
# `ParamConfig` marks parameters that particle operations should leave alone, the way
# `requires_grad=False` does for gradient descent. Custom operators see each parameter
# together with its config.

# %%
import torch
import nytorch as nyto


class Linear(nyto.NytoModule):
    def __init__(self, w, b):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.Tensor([w]))
        self.bias = torch.nn.Parameter(torch.Tensor([b]))

    def forward(self, x):
        return self.weight * x + self.bias


class DNN(nyto.NytoModule):
    def __init__(self):
        super().__init__()
        self.layer0 = Linear(1., 2.)
        self.layer1 = Linear(3., 4.)

    def forward(self, x):
        return self.layer1(self.layer0(x))


net = DNN()

# %% [markdown]
# ## Leave `layer0` out of arithmetic
# From the submodule, or by name from the root — both spellings of nytorch 1.1 work.

# %%
net.layer0.set_param_config(operational=False)      # or: net.set_param_config(operational=False, name="layer0")
doubled = 2 * net
for name, param in doubled.named_parameters():
    print(name, param.data)

# %% [markdown]
# `clone=True` (the default) gives results a copy of a frozen parameter; `clone=False` shares the very same Parameter.

# %%
print("clone=True shares?", (2 * net).layer0.weight is net.layer0.weight)
net.set_param_config(clone=False, name="layer0")
print("clone=False shares?", (2 * net).layer0.weight is net.layer0.weight)

# %% [markdown]
# Configs are shared by every model derived from one another (nytorch 1.1's "species"): setting one
# after deriving still applies to both.

# %%
child = net + 1
net.set_param_config(operational=False, name="layer1")
print("child's layer1 frozen too:", torch.equal((child * 10).layer1.weight, child.layer1.weight))
net.set_param_config(operational=True)               # unfreeze everything again
net.set_param_config(clone=True)

# %% [markdown]
# ## Custom attributes and custom operators
# Mark weights and biases, then write an operator that treats them differently
# (`unary_operator` / `binary_operator` receive `fn(param, [other,] config)`).

# %%
weights = {net.get_param_id(p) for name, p in net.named_parameters() if name.endswith("weight")}

def mark(param_id, config):
    config.is_weight = param_id in weights

net.apply_param_config(mark)
net.apply_param_config(lambda param_id, config: print(param_id, config))

# %%
def shrink_weights_only(param, config):
    return param * 0.5 if config.is_weight else param.clone()

shrunk = net.product().unary_operator(shrink_weights_only).module()
for name, param in shrunk.named_parameters():
    print(name, param.data)

# %%
def keep_larger(a, b, config):
    return torch.maximum(a, b)

other = net.randn()
print(net.product().binary_operator(other.product(), keep_larger).params)

# %% [markdown]
# ## Migrating nytorch 1.1 code
# Code written against the 1.1 documented API runs unchanged:
#
# | nytorch 1.1 | nytorch 2 |
# |---|---|
# | operators, `clone`, `detach`, `clone_from`, `randn`, `rand` | same |
# | `product()` → `ParamProduct`, `.module()`, `product_()` | same (`ParamProduct` is `Particle`) |
# | `set_param_config` / `apply_param_config` / `get_param_id`, `ParamConfig` | same |
# | `touch()`, version manager, particle kernels | gone: the module tree is read as it is, every time |
# | `ParticleModule(net)` to break reference cycles | use `net`: there are no cycles |
# | models must be "of the same species" | any two models of one class with matching parameters combine |
# | `AssertionError` on misuse | `TypeError` / `StructureError` naming the parameter |
#
# Runs unchanged, but does not always compute the same: param ids, buffers (cloned into results, not
# shared), integer parameters (carried, not computed on), tied weights (kept tied), the order in which
# `randn()` and custom operators visit parameters, `product().params` (keyed by name, not by id), custom
# operators' results (fresh Parameters) and the configs of replaced submodules differ from 1.1. The
# README's "Migration from nytorch 1.1" section explains each.

# %%
net_a, net_b = DNN(), DNN()                 # built independently: 1.1 refused this, nytorch 2 accepts it
print((net_a + net_b).layer1.weight.data)

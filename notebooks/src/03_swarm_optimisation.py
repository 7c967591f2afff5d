# %% [markdown]
# # 03 · Swarm optimisation: 32 MLPs trained as one value
#
# Hybrid evolutionary + gradient training keeps many copies of a network, each with its own
# parameters, and evaluates, ranks, combines and trains them all. Written as a Python list of
# modules, every step pays P forwards, P backwards and P × (number of tensors) tiny kernels.
#
# A `nytorch.Swarm` stores the P members stacked: each parameter becomes one tensor with a
# leading member dimension P. A forward of every member is one vectorised call: a chain of
# Linear layers and elementwise activations (such as this notebook's MLP) runs as batched
# matrix products (`torch.baddbmm`), any other model as one `torch.func.vmap` over
# `torch.func.functional_call`; per-member gradients are one `vmap(grad)`; arithmetic on the
# whole swarm is a handful of batched kernels. `nytorch.algorithms` holds the swarm algorithms
# (PSO, accelerated PSO, evolution strategies, selection, the nytorch 1.1 hybrid loop) as small
# pure functions over swarms.
#
# This notebook trains 32 iris MLPs with SGD on every member plus a particle-swarm step every
# 10 steps, then times the vectorised step against a Python loop of modules and watches the
# swarm move in a 2-D projection of parameter space.

# %%
import time

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from sklearn.datasets import load_iris
from sklearn.model_selection import train_test_split
from torch import nn

import nytorch
from nytorch import algorithms as alg
from nytorch import merge

torch.set_num_threads(1)  # the kernels are tiny: one thread is fastest and makes timings stable
_ = torch.manual_seed(0)

iris = load_iris()
x_train, x_test, y_train, y_test = train_test_split(iris.data, iris.target, test_size=0.2, random_state=0)
x_train, x_test = torch.tensor(x_train, dtype=torch.float32), torch.tensor(x_test, dtype=torch.float32)
mean, std = x_train.mean(0), x_train.std(0)
x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
y_train, y_test = torch.tensor(y_train), torch.tensor(y_test)
print("train", tuple(x_train.shape), " test", tuple(x_test.shape))

# %% [markdown]
# ## A swarm of 32 MLPs
# Any `nn.Module` works as a member; `Swarm.stack` copies the members' values into stacked storage.

# %%
P = 32


def make_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))


members = [make_mlp() for _ in range(P)]
swarm = nytorch.Swarm.stack(members)
print(swarm)
print({name: tuple(value.shape) for name, value in swarm.params.items()})

# %% [markdown]
# `swarm(x)` runs every member's forward in one vectorised call and stacks the outputs
# `[P, batch, classes]`; `swarm[i]` is member `i` as a `Particle`. The vectorised result equals
# the per-member loop:

# %%
logits = swarm(x_train)
loop_logits = torch.stack([member(x_train) for member in members])
print("swarm(x):", tuple(logits.shape), " max |swarm(x) − loop| =", f"{(logits - loop_logits).abs().max():.1e}")

# %% [markdown]
# ## Hybrid PSO + SGD
# Every step is one SGD step on all 32 members (`alg.sgd_step`: one `vmap(grad_and_value)` call
# and one fused update). Every 10 steps `alg.pso_step` moves each member with the classic
# inertia / cognitive / social rule
#
# $$v_i \leftarrow w\,v_i + c_1 r_1 \odot (b_i - x_i) + c_2 r_2 \odot (g - x_i), \qquad x_i \leftarrow x_i + v_i,$$
#
# where $b_i$ is member $i$'s best position so far and $g$ the swarm's best. Both functions are
# pure: they return new swarms and leave their inputs alone. We also keep each step's positions
# as one `[P, n]` matrix (`merge.ravel`) for the projection at the end.

# %%
STEPS, LR, EVERY = 300, 0.1, 10


def loss_fn(member, x, y):
    return F.cross_entropy(member(x), y)


@torch.no_grad()
def losses_of(swarm, x, y):
    logits = swarm(x)  # [P, N, 3]
    return F.cross_entropy(logits.transpose(1, 2), y.expand(len(swarm), -1), reduction="none").mean(1)


generator = torch.Generator().manual_seed(0)
pso = alg.pso_init(swarm, losses_of(swarm, x_train, y_train))
best_loss, mean_loss, positions = [], [], [merge.ravel(swarm)[0]]
began = time.perf_counter()
for step in range(STEPS):
    swarm, losses = alg.sgd_step(swarm, loss_fn, x_train, y_train, lr=LR)
    if (step + 1) % EVERY == 0:
        swarm, pso = alg.pso_step(swarm, losses_of(swarm, x_train, y_train), pso, inertia=0.5,
                                  cognitive=0.8, social=0.8, generator=generator)
    best_loss.append(float(losses.min()))
    mean_loss.append(float(losses.mean()))
    positions.append(merge.ravel(swarm)[0])
print(f"{STEPS} steps of {P} members in {time.perf_counter() - began:.2f} s; "
      f"final best loss {best_loss[-1]:.4f}, mean loss {mean_loss[-1]:.4f}")

# %%
fig, ax = plt.subplots(figsize=(7, 3.8))
ax.plot(range(1, STEPS + 1), best_loss, label="best member")
ax.plot(range(1, STEPS + 1), mean_loss, label="swarm mean")
for k, at in enumerate(range(EVERY, STEPS + 1, EVERY)):
    ax.axvline(at, color="grey", alpha=0.15, linewidth=1, label="PSO step" if k == 0 else None)
ax.set_yscale("log")
ax.set_xlabel("step")
ax.set_ylabel("training loss (cross-entropy)")
ax.set_title(f"Hybrid PSO + SGD on iris: {P} MLPs")
ax.legend()
fig.tight_layout()
plt.show()

# %% [markdown]
# The best member is chosen on training loss only, then scored on the held-out test set:

# %%
with torch.no_grad():
    final_losses = losses_of(swarm, x_train, y_train)
    test_accuracy = (swarm(x_test).argmax(-1) == y_test).float().mean(1)
best = int(final_losses.argmin())
print(f"best member #{best}: test accuracy {test_accuracy[best]:.3f}  "
      f"(swarm: min {test_accuracy.min():.3f}, mean {test_accuracy.mean():.3f})")
winner = swarm[best].module()  # a plain nn.Sequential holding the winner's weights
print(type(winner).__name__, "accuracy again:", f"{(winner(x_test).argmax(-1) == y_test).float().mean():.3f}")

# %% [markdown]
# ## How much the vectorisation buys
# The same computation both ways, measured side by side on this machine: an SGD step on every
# member (forward, cross-entropy, gradient, update) as one `alg.sgd_step` call, and as a Python
# loop over 32 ordinary modules with `torch.autograd.grad`. Both start from the same weights,
# and we check that they end at the same weights too.

# %%
start = [make_mlp() for _ in range(P)]


def loop_step(modules, x, y, lr):
    for module in modules:
        params = list(module.parameters())
        grads = torch.autograd.grad(F.cross_entropy(module(x), y), params)
        with torch.no_grad():
            for param, grad in zip(params, grads):
                param.sub_(lr * grad)


def swarm_step(swarm, x, y, lr):
    return alg.sgd_step(swarm, loss_fn, x, y, lr=lr)[0]


def best_time(fn, repeats=5, number=20):
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        for _ in range(number):
            fn()
        times.append((time.perf_counter() - began) / number)
    return min(times)


# correctness first: 20 steps each way from the same start
loop_modules = [nytorch.particle(m).clone().module() for m in start]
vector_swarm = nytorch.Swarm.stack(start)
for _ in range(20):
    loop_step(loop_modules, x_train, y_train, LR)
    vector_swarm = swarm_step(vector_swarm, x_train, y_train, LR)
gap = (nytorch.Swarm.stack(loop_modules) - vector_swarm).norm().max()
print(f"after 20 steps, largest distance between loop and swarm members: {float(gap):.1e}")

state = {"swarm": nytorch.Swarm.stack(start)}
loop_seconds = best_time(lambda: loop_step(loop_modules, x_train, y_train, LR))
swarm_seconds = best_time(lambda: state.update(swarm=swarm_step(state["swarm"], x_train, y_train, LR)))
with torch.no_grad():  # inference only: neither side records a graph
    forward_loop = best_time(lambda: torch.stack([m(x_train) for m in loop_modules]), number=50)
    forward_swarm = best_time(lambda: state["swarm"](x_train), number=50)

print(f"{'one step, 32 members':<28}{'Python loop':>12}{'Swarm':>10}{'loop / Swarm':>14}")
print(f"{'SGD step (fwd + grad + upd)':<28}{loop_seconds * 1e3:>10.2f}ms{swarm_seconds * 1e3:>8.2f}ms"
      f"{loop_seconds / swarm_seconds:>13.1f}x")
print(f"{'forward only':<28}{forward_loop * 1e3:>10.2f}ms{forward_swarm * 1e3:>8.2f}ms"
      f"{forward_loop / forward_swarm:>13.1f}x")

# %% [markdown]
# ## The swarm in parameter space
# Each member is a point in the 131-dimensional parameter space. Stacking every step's `[P, n]`
# matrix and projecting onto the first two principal components shows the swarm over time:
# members start spread out, SGD moves each downhill, and every PSO step pulls them toward the
# swarm's best until they gather in one basin.

# %%
trajectory = torch.stack(positions)                # [STEPS + 1, P, n]
flat = trajectory.reshape(-1, trajectory.shape[-1])
centred = flat - flat.mean(0)
_, singular, basis = torch.linalg.svd(centred, full_matrices=False)
projected = (centred @ basis[:2].T).reshape(trajectory.shape[0], P, 2)
explained = (singular[:2] ** 2 / (singular ** 2).sum()).tolist()
steps = torch.arange(trajectory.shape[0]).repeat_interleave(P)

fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
points = left.scatter(projected[..., 0].reshape(-1), projected[..., 1].reshape(-1), c=steps, cmap="viridis",
                      s=4, alpha=0.6)
left.scatter(projected[0, :, 0], projected[0, :, 1], marker="o", facecolors="none", edgecolors="black",
             s=30, label="initial members")
left.scatter(projected[-1, best, 0], projected[-1, best, 1], marker="*", color="red", s=200, label="final best")
fig.colorbar(points, ax=left, label="step")
left.set_xlabel(f"PC 1 ({explained[0]:.0%} of variance)")
left.set_ylabel(f"PC 2 ({explained[1]:.0%} of variance)")
left.set_title("Swarm positions (PCA), coloured by step")
left.legend(loc="best")

spread = (trajectory - trajectory.mean(1, keepdim=True)).norm(dim=-1).mean(1)
right.plot(spread)
right.set_xlabel("step")
right.set_ylabel("mean distance to the swarm's centre")
right.set_title("Swarm spread")
fig.tight_layout()
plt.show()

# %% [markdown]
# ## The nytorch 1.1 hybrid loop in one call
# `alg.hybrid` is the loop from the nytorch 1.1 "example code" chapter: SGD on every member and,
# every `every` steps, a random subset pulled toward its best member. It returns the final swarm
# and the per-member losses of every step (a tqdm bar appears when run in a terminal).

# %%
start_swarm = nytorch.Swarm.stack([make_mlp() for _ in range(P)])
final, history = alg.hybrid(start_swarm, loss_fn, [(x_train, y_train)] * 200, lr=LR, every=5, subset=8,
                            alpha=0.5, generator=torch.Generator().manual_seed(0), show_progress=False)
print("history:", tuple(history.shape), f" best loss {history[-1].min():.4f}, mean {history[-1].mean():.4f}")

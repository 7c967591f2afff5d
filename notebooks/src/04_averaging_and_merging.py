# %% [markdown]
# # 04 · Averaging and merging whole models
#
# Many training tricks are arithmetic on whole models: a MoCo momentum encoder and a DQN target
# network are exponential moving averages of the online network; SWA and model soups average
# several trained copies; task arithmetic and TIES add up what fine-tuning changed. In plain
# PyTorch these come from four libraries, each with its own bugs around tied weights, integer
# buffers and mismatched models. `nytorch.merge` does all of it in memory on live models.
#
# Everything below runs on scikit-learn's digits (8×8 images, 10 classes) with a small MLP that
# has a `BatchNorm1d` layer, so buffers (running statistics and the integer
# `num_batches_tracked`) are part of the story.

# %%
import copy
import time

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

import nytorch
from nytorch import merge

torch.set_num_threads(1)  # tiny model: one thread is fastest here
_ = torch.manual_seed(0)

digits = load_digits()
x, y = digits.data / 16.0, digits.target
x_train, x_rest, y_train, y_rest = train_test_split(x, y, test_size=0.4, random_state=0, stratify=y)
x_val, x_test, y_val, y_test = train_test_split(x_rest, y_rest, test_size=0.5, random_state=0, stratify=y_rest)
as_tensors = lambda a, b: (torch.tensor(a, dtype=torch.float32), torch.tensor(b))  # noqa: E731
train, val, test = as_tensors(x_train, y_train), as_tensors(x_val, y_val), as_tensors(x_test, y_test)
print(f"train {len(train[0])}, validation {len(val[0])}, test {len(test[0])} images")


def make_net() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 10))


@torch.no_grad()
def accuracy(model: nn.Module, data) -> float:
    training = model.training
    model.eval()
    inputs, labels = data
    score = float((model(inputs).argmax(1) == labels).float().mean())
    model.train(training)
    return score

# %% [markdown]
# ## EMA, momentum encoders and soft target updates: one line each
# MoCo's key encoder follows the query encoder as $\theta_k \leftarrow m\,\theta_k + (1-m)\,\theta_q$;
# DQN/SAC/TD3 target networks follow the online network as
# $\theta' \leftarrow \tau\,\theta + (1-\tau)\,\theta'$. Both are `merge.ema_` — one fused
# `lerp_` over every tensor, in place. Floating buffers (BatchNorm statistics) are averaged too, as
# timm's model EMA does (or copied, or kept: `buffers="copy"` / `"keep"`; MoCo's key encoder keeps
# its own statistics, so a faithful MoCo passes `buffers="keep"`); integer buffers are copied, never
# averaged.

# %%
online = make_net()
key_encoder, target_net = copy.deepcopy(online), copy.deepcopy(online)
optimizer = torch.optim.SGD(online.parameters(), lr=0.5)
for _ in range(3):  # the online network moves on
    batch = torch.randint(len(train[0]), (64,))
    loss = F.cross_entropy(online(train[0][batch]), train[1][batch])
    optimizer.zero_grad(); loss.backward(); optimizer.step()

before = {k: v.clone() for k, v in key_encoder.state_dict().items()}
merge.ema_(key_encoder, online, decay=0.99)   # momentum encoder, m = 0.99 (statistics averaged too)
merge.ema_(target_net, online, tau=0.005)     # DQN soft target update, τ = 0.005

# the same by hand, tensor by tensor
expected = {name: (0.99 * value + 0.01 * online.state_dict()[name]) if value.is_floating_point()
            else online.state_dict()[name] for name, value in before.items()}
worst = max(float((key_encoder.state_dict()[n] - v).abs().max()) for n, v in expected.items() if v.is_floating_point())
print(f"ema_ vs per-tensor reference: max difference {worst:.1e}")
print("num_batches_tracked: online", int(online[1].num_batches_tracked), "→ key encoder",
      int(key_encoder[1].num_batches_tracked), "(copied, not averaged to", f"{0.99 * 0 + 0.01 * 3:.2f})")

# %% [markdown]
# The same update on a `Particle` is its `lerp_` method; on a `Swarm` (an ensemble of networks stored
# stacked) `ema_` updates every member at once:

# %%
target_particle = nytorch.particle(target_net)       # a view of target_net's tensors
_ = target_particle.lerp_(online, 0.005)              # target_net ← target_net + 0.005·(online − target_net)
q_ensemble = nytorch.Swarm.stack([make_net() for _ in range(4)])   # e.g. REDQ's ensemble of Q-networks
target_ensemble = q_ensemble.clone()
q_ensemble = q_ensemble + 0.1 * nytorch.Swarm.randn(q_ensemble)     # the online ensemble moves on
_ = merge.ema_(target_ensemble, q_ensemble, tau=0.005)             # four target networks, one call
print(target_ensemble)

# %% [markdown]
# ### The `EMA` helper in a training loop
# `merge.EMA` holds the averaged copy, updates it after each optimizer step (with an optional
# warm-up schedule, as in timm) and swaps it into the model for evaluation. Here SGD runs with a
# learning rate large enough to make it bounce around; the average of its iterates is much steadier.

# %%
_ = torch.manual_seed(1)
net = make_net()
optimizer = torch.optim.SGD(net.parameters(), lr=0.5, momentum=0.9)
ema = merge.EMA(net, decay=merge.warmup_decay(0.99))
raw_curve, ema_curve = [], []
generator = torch.Generator().manual_seed(1)
for epoch in range(15):
    for batch in torch.randperm(len(train[0]), generator=generator).split(32):
        loss = F.cross_entropy(net(train[0][batch]), train[1][batch])
        optimizer.zero_grad(); loss.backward(); optimizer.step()
        ema.update()                                   # averaged ← d·averaged + (1 − d)·net
    raw_curve.append(accuracy(net, val))
    with ema.swap():                                   # net holds the averages inside the block
        ema_curve.append(accuracy(net, val))
print(f"after {ema.step} updates: validation accuracy {raw_curve[-1]:.3f} (trained weights), "
      f"{ema_curve[-1]:.3f} (EMA); test {accuracy(net, test):.3f} vs {accuracy(ema.averaged, test):.3f}")

fig, ax = plt.subplots(figsize=(6.5, 3.5))
ax.plot(range(1, 16), raw_curve, marker="o", label="trained weights")
ax.plot(range(1, 16), ema_curve, marker="s", label="EMA of the weights (decay 0.99)")
ax.set_xlabel("epoch"); ax.set_ylabel("validation accuracy"); ax.set_title("SGD (lr 0.5, momentum 0.9) with and without EMA")
ax.legend(); fig.tight_layout(); plt.show()

# %% [markdown]
# ## Model soups, task arithmetic and TIES
# One network is pre-trained on a small slice of the training set, then fine-tuned five times,
# each copy on a subset dominated by two digit classes. Each copy is good at its two digits and
# worse elsewhere; merging them in weight space recovers a model that is good at all ten.
#
# * **uniform soup** — `merge.average(models)`: the mean of all weights (Wortsman et al. 2022);
#   BatchNorm running statistics are averaged too (`buffers="average"`, the default), or
#   recomputed on training data with `merge.update_bn(soup, loader)` like `swa_utils.update_bn`;
# * **greedy soup** — `merge.greedy_soup(models, evaluate)`: add a model only if validation accuracy improves;
# * **task arithmetic** — `merge.task_arithmetic(base, models, scale=λ)`: $\theta_0 + \lambda\sum_i(\theta_i - \theta_0)$ (Ilharco et al. 2023);
# * **TIES** — `merge.ties(base, models, density=k, scale=λ)`: trim each task vector to its largest
#   entries, elect a sign per entry, average the agreeing ones (Yadav et al. 2023).
#
# The scale λ of task arithmetic and TIES is chosen on the validation set; the test set is used only for the table.

# %%
def fit(model, data, *, steps, lr, seed):
    """Mini-batch Adam on cross-entropy, in place (train mode: BatchNorm statistics update too)."""
    inputs, labels = data
    gen = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        batch = torch.randint(len(inputs), (64,), generator=gen)
        loss = F.cross_entropy(model(inputs[batch]), labels[batch])
        optimizer.zero_grad(); loss.backward(); optimizer.step()
    return model


began = time.perf_counter()
_ = torch.manual_seed(0)
base = make_net()
warm = torch.randperm(len(train[0]), generator=torch.Generator().manual_seed(0))[:150]
fit(base, (train[0][warm], train[1][warm]), steps=150, lr=3e-3, seed=0)

rng = np.random.default_rng(0)
labels = train[1].numpy()
finetuned = []
for k in range(5):
    favoured = np.isin(labels, [2 * k, 2 * k + 1])
    others = rng.choice(np.flatnonzero(~favoured), size=favoured.sum() // 9, replace=False)
    index = torch.tensor(np.concatenate([np.flatnonzero(favoured), others]))
    model = copy.deepcopy(base)                   # every copy starts from the pre-trained net
    finetuned.append(fit(model, (train[0][index], train[1][index]), steps=200, lr=1e-3, seed=1 + k))
print(f"pre-training and 5 fine-tunings: {time.perf_counter() - began:.1f} s")
print("BatchNorm running means differ between copies:",
      [f"{float(m[1].running_mean.mean()):+.3f}" for m in finetuned])

# %%
SCALES = (0.1, 0.2, 0.3, 0.4, 0.6, 0.8, 1.0)
bn_loader = train[0].split(256)   # batches for recomputing BatchNorm statistics


def recompute_bn(model):
    return merge.update_bn(copy.deepcopy(model), bn_loader)


def best_scale(build):
    """The merge whose scale λ scores best on validation data."""
    scored = [(accuracy(model, val), -scale, scale, model) for scale in SCALES for model in [build(scale)]]
    _, _, scale, model = max(scored, key=lambda item: item[:2])
    return model, scale


began = time.perf_counter()
rows = [("pre-trained base", base)]
rows += [(f"fine-tuned on digits {2 * k},{2 * k + 1}", m) for k, m in enumerate(finetuned)]
rows.append(("uniform soup, BN statistics averaged", merge.average(finetuned)))
rows.append(("uniform soup, BN statistics recomputed", recompute_bn(merge.average(finetuned))))
greedy = merge.greedy_soup(finetuned, lambda model: accuracy(model, val))
rows.append((f"greedy soup ({len(greedy.ingredients)} of 5 models)", greedy.model))
arithmetic, scale = best_scale(lambda s: merge.task_arithmetic(base, finetuned, scale=s))
rows.append((f"task arithmetic (λ = {scale})", arithmetic))
ties, scale = best_scale(lambda s: merge.ties(base, finetuned, density=0.2, scale=s))
rows.append((f"TIES (density 0.2, λ = {scale})", ties))
merging_seconds = time.perf_counter() - began

table = [(name, accuracy(model, val), accuracy(model, test)) for name, model in rows]
width = max(len(name) for name, _, _ in table)
print(f"{'model':<{width}}  val acc  test acc")
print("-" * (width + 19))
for name, val_acc, test_acc in table:
    print(f"{name:<{width}}  {val_acc:7.3f}  {test_acc:8.3f}")
print(f"(all merges, including the scale searches: {merging_seconds * 1e3:.0f} ms)")

# %%
fig, ax = plt.subplots(figsize=(8, 4.2))
names = [name for name, _, _ in table]
colours = ["grey"] + ["tab:blue"] * 5 + ["tab:orange"] * (len(table) - 6)
ax.barh(names[::-1], [t for _, _, t in table][::-1], color=colours[::-1])
ax.set_xlim(0.7, 1.0)
ax.set_xlabel("test accuracy")
ax.set_title("Digits, test accuracy: base (grey), fine-tuned copies (blue), merges (orange)")
for i, (_, _, t) in enumerate(table[::-1]):
    ax.text(t + 0.005, i, f"{t:.3f}", va="center", fontsize=8)
fig.tight_layout()
plt.show()

# %% [markdown]
# Every merge above returns a fresh `nn.Sequential` (the models' own class), ready to evaluate
# or train further; the inputs are untouched. The same functions accept `Particle`s, dicts of
# tensors and `Swarm`s (`merge.average(swarm)` averages its members), and `merge.ravel(model)`
# turns any of them into one flat vector and back, for black-box optimisers such as CMA-ES.

# %%
vector, unravel = merge.ravel(arithmetic)
restored = unravel(vector)
print("flat vector:", tuple(vector.shape), "| round trip equal:",
      all(torch.equal(a, b) for a, b in zip(restored.parameters(), arithmetic.parameters())))

# mypy: disable-error-code="operator"
# (torch.add / torch.pow picked from a dict are untyped, and Tensor.grad is Optional: noise in these checks)
"""nytorch 1.1 compatibility of ParamConfig and the config API, differentially against the real 1.1.

One scenario script (``SCENARIOS``, written against the 1.1 documented API only) runs in two
subprocesses, cwd outside the repository: once with ``PYTHONPATH`` at this nytorch, once at the
reference nytorch 1.1 installed at ``/tmp/nyto11`` (``NYTORCH11_PATH``).  It covers every
``(operational, clone)`` combination through every operator, ``product()`` arithmetic, ``product_``,
``unary_operator`` / ``binary_operator``, ``randn`` / ``rand``, ``clone`` / ``detach`` / ``clone_from``;
configs by ``name=`` for nested submodules, tied parameters and a submodule registered twice;
``get_param_id`` on tied parameters; configs shared or copied by derived models; optimizers holding
parameters across in-place operators; and which operands raise.  Every key must agree, except the
differences listed in ``DOCUMENTED`` (each with the README migration wording that says so) and in
``UNDOCUMENTED`` (deliberate, reported to the lead with the sentence to add).  Without the
reference installation the comparisons skip; the checks of this nytorch against plain torch run anyway.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import json_close

NYTO11 = Path(os.environ.get("NYTORCH11_PATH", "/tmp/nyto11"))
ROOT = Path(__file__).resolve().parents[1]

SCENARIOS = r'''
import copy, json, torch
from torch import nn
import nytorch
from nytorch import NytoModule


def values(module):
    return {name: [round(v, 6) for v in p.detach().reshape(-1).tolist()] for name, p in module.named_parameters()}

def pvalues(product):
    return values(product.module())

def err(fn):
    try:
        fn()
    except Exception as e:
        return type(e).__name__
    return "ok"


class Three(NytoModule):
    def __init__(self):
        super().__init__()
        self.a = nn.Parameter(torch.tensor([1., 2.]))
        self.b = nn.Parameter(torch.tensor([3., -4.]))
        self.c = nn.Parameter(torch.tensor([0.5, 6.]))


class Inner(NytoModule):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(2, 2)


class Nested(NytoModule):
    def __init__(self):
        super().__init__()
        self.block = Inner()
        self.head = nn.Linear(2, 1)


class Twice(NytoModule):
    def __init__(self):
        super().__init__()
        lin = nn.Linear(2, 2)
        self.first = lin
        self.second = lin
        self.last = nn.Linear(2, 1)


class TiedTop(NytoModule):
    def __init__(self):
        super().__init__()
        self.w1 = nn.Parameter(torch.tensor([1., 2.]))
        self.w2 = self.w1
        self.w3 = nn.Parameter(torch.tensor([5., 6.]))


def three(op=True, cl=True):
    net = Three()
    net.set_param_config(operational=op, clone=cl, name="b")
    return net


class SeqNet(NytoModule):
    def __init__(self):
        super().__init__()
        self.seq = nn.Sequential(Inner(), nn.Linear(2, 2))
        self.w = nn.Parameter(torch.ones(2))


class Mixed(NytoModule):
    def __init__(self):
        super().__init__()
        self.a = nn.Parameter(torch.zeros(3))
        self.b = nn.Parameter(torch.zeros(5, dtype=torch.float64))
        self.c = nn.Parameter(torch.zeros(4))


class Big(NytoModule):
    def __init__(self):
        super().__init__()
        self.l1 = nn.Linear(20, 17)
        self.l2 = nn.Linear(17, 33)


class AE(NytoModule):
    def __init__(self):
        super().__init__()
        self.enc = nn.Linear(2, 2)
        self.dec = nn.Linear(2, 2)
        self.dec.weight = self.enc.weight


def run():
    out = {}
    torch.manual_seed(0)
    ops = {
        "add_s": lambda n, m: n + 2, "radd_s": lambda n, m: 2 + n, "sub_s": lambda n, m: n - 2,
        "rsub_s": lambda n, m: 2 - n, "mul_s": lambda n, m: n * 3, "rmul_s": lambda n, m: 3 * n,
        "div_s": lambda n, m: n / 4, "rdiv_s": lambda n, m: 4 / n, "pow_s": lambda n, m: n ** 2,
        "rpow_s": lambda n, m: 2 ** n, "neg": lambda n, m: -n, "pos": lambda n, m: +n,
        "add_m": lambda n, m: n + m, "sub_m": lambda n, m: n - m, "mul_m": lambda n, m: n * m,
        "div_m": lambda n, m: n / m, "pow_m": lambda n, m: n ** m,
        "radd_m": lambda n, m: m + n, "rsub_m": lambda n, m: m - n,
        "clone": lambda n, m: n.clone(), "tensor0": lambda n, m: n * torch.tensor(2.),
    }
    for op, cl in ((False, True), (False, False)):
        for key, fn in ops.items():
            net = three(op, cl)
            other = net.clone() * 0 + 3  # same species
            b = net.b
            res = fn(net, other)
            k = "op.%s.%s.%s" % (op, cl, key)
            out[k] = values(res)
            out[k + ".same_b"] = res.b is b
            out[k + ".rg"] = [p.requires_grad for p in res.parameters()]
            # same through the product
            net = three(op, cl)
            other = net.clone() * 0 + 3
            b = net.b
            if key in ("pos",):
                continue
            if key == "clone":
                pres = net.product().clone()
            elif key.endswith("_m"):
                pres = fn(net.product(), other.product())
            else:
                pres = fn(net.product(), None)
            mod = pres.module()
            out["prod." + k] = values(mod)
            out["prod." + k + ".same_b"] = mod.b is b
        for iop in ["+=", "-=", "*=", "/=", "**="]:
            for rhs in ("2", "other"):
                net = three(op, cl)
                other = net.clone() * 0 + 3
                ids = [id(p) for p in net.parameters()]
                scope = {"net": net, "other": other}
                exec("net " + iop + " " + rhs, scope)
                k = "iop.%s.%s.%s.%s" % (op, cl, iop, rhs)
                out[k] = values(scope["net"])
                out[k + ".same"] = [id(p) for p in scope["net"].parameters()] == ids
        # product_ with a product from a clone, and from itself
        net = three(op, cl)
        ids = [id(p) for p in net.parameters()]
        net.product_(net.clone().product() * 5)
        out["product_.%s.%s" % (op, cl)] = values(net)
        out["product_.%s.%s.same" % (op, cl)] = [id(p) for p in net.parameters()] == ids
        # randn / rand skip non-op params, seeded
        net = three(op, cl)
        torch.manual_seed(3)
        r = net.randn()
        out["randn.%s.%s" % (op, cl)] = values(r)
        out["randn.%s.%s.same_b" % (op, cl)] = r.b is net.b
        torch.manual_seed(3)
        out["prandn.%s.%s" % (op, cl)] = pvalues(net.product().randn())
        torch.manual_seed(4)
        out["rand.%s.%s" % (op, cl)] = values(net.rand())
        torch.manual_seed(4)
        out["prand.%s.%s" % (op, cl)] = pvalues(net.product().rand())
        # custom operators honoring or ignoring config
        net = three(op, cl)
        b = net.b
        u = net.product().unary_operator(
            lambda p, c: nn.Parameter(p + 10) if c.operational else (nn.Parameter(p.clone()) if c.clone else p)
        ).module()
        out["unary.%s.%s" % (op, cl)] = values(u)
        out["unary.%s.%s.same_b" % (op, cl)] = u.b is b
        u = net.product().unary_operator(lambda p, c: nn.Parameter(p * 10)).module()
        out["unary_ignore.%s.%s" % (op, cl)] = values(u)
        other = net.clone() * 0 + 3
        bi = net.product().binary_operator(
            other.product(), lambda p, q, c: nn.Parameter(p * q) if c.operational else p).module()
        out["binary.%s.%s" % (op, cl)] = values(bi)
        out["binary.%s.%s.same_b" % (op, cl)] = bi.b is b
        # clone / detach / clone_from carry and share configs
        net = three(op, cl)
        c1 = net.clone()
        out["cfg.clone.%s.%s" % (op, cl)] = values(c1 * 2)
        out["cfg.clone.same_b.%s.%s" % (op, cl)] = c1.b is net.b
        d = net.detach()
        out["cfg.detach.%s.%s" % (op, cl)] = values(d * 2)
        cf = net.clone_from(Three())
        out["cfg.clone_from.%s.%s" % (op, cl)] = values(cf * 2)
        out["cfg.clone_from.same_b.%s.%s" % (op, cl)] = cf.b is net.b
    # sharing: config set later on a derived model reaches the source (and not across detach)
    for how in ("clone", "detach", "clone_from", "op", "product"):
        net = Three()
        if how == "clone":
            der = net.clone()
        elif how == "detach":
            der = net.detach()
        elif how == "clone_from":
            der = net.clone_from(Three())
        elif how == "op":
            der = net * 1
        else:
            der = net.product().module()
        der.set_param_config(operational=False, name="a")
        out["share.%s.src" % how] = values(net * 2)
        out["share.%s.der" % how] = values(der * 2)
        net.set_param_config(operational=False, name="c")
        out["share.%s.back" % how] = values(der * 2)
    # custom attrs across clone/detach
    net = Three()
    def tag(pid, conf):
        conf.tag = pid
    net.apply_param_config(tag)
    for how, der in (("clone", net.clone()), ("op", net + 1), ("clone_from", net.clone_from(Three()))):
        seen = []
        der.apply_param_config(lambda pid, conf: seen.append(getattr(conf, "tag", None)))
        out["tags." + how] = seen
    # nested names
    for name in ("block", "head"):
        net = Nested()
        net.set_param_config(operational=False, name=name)
        res = net * 2
        out["nested.%s" % name] = values(res)
    net = Nested()
    net.block.set_param_config(operational=False, name="lin")
    out["nested.sub.lin"] = values(net * 2)
    out["nested.sub.lin.on_sub"] = values(net.block * 2)
    net = Nested()
    out["nested.err.dotted"] = err(lambda: net.set_param_config(operational=False, name="nope"))
    out["nested.err.buffer"] = err(lambda: net.set_param_config(operational=False, name=""))
    seen = []
    net.apply_param_config(lambda pid, conf: seen.append(pid), name="head")
    out["nested.ids.head"] = seen
    seen = []
    net.block.apply_param_config(lambda pid, conf: seen.append(pid))
    out["nested.ids.block"] = seen
    # registered twice
    for name in ("first", "second", "last"):
        net = Twice()
        net.set_param_config(operational=False, name=name)
        res = net * 2
        out["twice.%s" % name] = values(res)
        out["twice.%s.tied" % name] = res.first is res.second
        seen = []
        net.apply_param_config(lambda pid, conf: seen.append(conf.operational))
        out["twice.%s.flags" % name] = seen
    net = Twice()
    out["twice.ids"] = [net.get_param_id(p) for p in net.parameters()]
    out["twice.id.second"] = net.get_param_id(net.second.weight)
    # tied at top level
    for name in ("w1", "w2", "w3"):
        net = TiedTop()
        net.set_param_config(operational=False, name=name)
        res = net + 1
        out["tied.%s" % name] = values(res)
        out["tied.%s.tied" % name] = res.w1 is res.w2
        seen = []
        net.apply_param_config(lambda pid, conf: seen.append(pid), name=name)
        out["tied.%s.ids" % name] = seen
    net = TiedTop()
    out["tied.ids"] = [net.get_param_id(net.w1), net.get_param_id(net.w2), net.get_param_id(net.w3)]
    out["tied.named"] = [n for n, _ in net.named_parameters()]
    # optimizers holding parameters across in-place ops
    for opt_name in ("SGD", "Adam"):
        torch.manual_seed(0)
        net = Three()
        net.set_param_config(operational=False, clone=False, name="c")
        extra = {"momentum": 0.9} if opt_name == "SGD" else {}
        opt = getattr(torch.optim, opt_name)(net.parameters(), lr=0.1, **extra)
        for step in range(3):
            opt.zero_grad()
            loss = (net.a * net.b * net.c).sum()
            loss.backward()
            opt.step()
            net *= 0.5
            net += net.clone()
            net.product_(net.product() - 0.1)
        out["opt.%s" % opt_name] = values(net)
    # errors for mismatched species / kinds
    a, b = Three(), Three()
    out["err.product_plus_module"] = err(lambda: a.product() + a)
    out["err.module_plus_product"] = err(lambda: a + a.product())
    out["err.other_class"] = err(lambda: a + Nested())
    out["err.plain_module"] = err(lambda: a + nn.Linear(1, 1))
    out["err.str"] = err(lambda: a + "x")
    out["err.none"] = err(lambda: a * None)
    out["err.list"] = err(lambda: a * [1.0])
    out["vec.tensor1"] = err(lambda: a * torch.tensor([2.]))
    out["err.product_other_class"] = err(lambda: a.product_(Nested().product()))
    out["err.binary_op_module"] = err(lambda: a.product().binary_operator(a, lambda p, q, c: p))
    # self-aliasing in-place
    for iop in ["+=", "-=", "*=", "/=", "**="]:
        for op, cl in ((True, True), (False, True), (False, False)):
            net = three(op, cl)
            scope = {"net": net}
            exec("net " + iop + " net", scope)
            out["self.%s.%s.%s" % (iop, op, cl)] = values(scope["net"])
    # frozen param
    net = Three(); net.b.requires_grad_(False)
    for key, fn in (("add", lambda n: n + 1), ("clone", lambda n: n.clone()), ("randn", lambda n: n.randn()),
                    ("prod", lambda n: (n.product() * 2).module()),
                    ("unary", lambda n: n.product().unary_operator(lambda p, c: nn.Parameter(p + 1)).module())):
        torch.manual_seed(0)
        r = fn(net)
        out["frozen." + key] = [p.requires_grad for p in r.parameters()]
    # derived submodule config reaches source
    net = Nested()
    der = net * 2
    der.block.set_param_config(operational=False)
    out["dersub"] = values(net * 3)
    # submodule product
    net = Nested()
    out["subprod"] = values((net.block.product() * 2).module())
    # errors on name
    class WithBuf(NytoModule):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(2))
            self.register_buffer("buf", torch.ones(2))
            self.register_parameter("none", None)
            self.plain = 3
    n = WithBuf()
    for name in ("buf", "none", "plain", "missing", "w"):
        out["name_err." + name] = err(lambda: n.set_param_config(operational=False, name=name))
    out["gid.foreign"] = err(lambda: n.get_param_id(nn.Parameter(torch.ones(2))))
    out["gid.buffer"] = err(lambda: n.get_param_id(n.buf))
    # replaced parameter keeps/reset config
    net = Three()
    net.set_param_config(operational=False, name="b")
    net.b = nn.Parameter(torch.tensor([7., 8.]))
    out["replaced_param"] = values(net * 2)
    net = Three()
    net.set_param_config(operational=False, name="b")
    del net.b
    net.b = nn.Parameter(torch.tensor([7., 8.]))
    out["readded_param"] = values(net * 2)
    # new param after configuring all
    net = Three()
    net.set_param_config(operational=False)
    net.d = nn.Parameter(torch.tensor([1.]))
    out["new_param_default"] = values(net * 2)
    # detach custom attrs
    net = Three()
    net.apply_param_config(lambda pid, conf: setattr(conf, "tag", pid))
    seen = []
    net.detach().apply_param_config(lambda pid, conf: seen.append(getattr(conf, "tag", None)))
    out["tags.detach"] = seen
    # backward after in-place op
    net = Three()
    loss = (net.a * net.b).sum()
    net += 1
    out["backward_after_iop"] = err(lambda: loss.backward())
    out["grad_after_iop"] = None if net.a.grad is None else net.a.grad.tolist()
    # in-place with product operand, module operand from product
    net = Three()
    out["iop.product"] = err(lambda: net.__iadd__(net.product()))
    for op, cl in ((False, True), (False, False)):
        net = three(op, cl)
        for key, fn in (("randn", lambda p: p.randn()), ("rand", lambda p: p.rand()), ("pos", lambda p: +p),
                        ("clone", lambda p: p.clone())):
            torch.manual_seed(1)
            m = fn(net.product()).module()
            out["p.%s.%s.%s" % (key, op, cl)] = values(m)
            out["p.%s.%s.%s.same_b" % (key, op, cl)] = m.b is net.b
    class Plain(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Parameter(torch.tensor([9., 9.]))
            self.b = nn.Parameter(torch.tensor([8., 8.]))
            self.c = nn.Parameter(torch.tensor([7., 7.]))
    net = Three()
    out["clone_from.plain"] = values(net.clone_from(Plain()))
    class Less(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Parameter(torch.tensor([9., 9.]))
    out["clone_from.less"] = err(lambda: net.clone_from(Less()))
    out["clone_from.shape"] = err(lambda: net.clone_from(Plain().requires_grad_(False).__class__()) )
    # product taken before an in-place operator / optimizer step / config change
    net = Three(); pp = net.product(); net += 1
    out["live.iop"] = pvalues(pp * 1)
    net = Three(); pp = net.product(); net *= 2; net += 1
    out["live.iop2"] = pvalues(pp + 0)
    net = Three(); net += 0; pp = net.product(); net += 1
    out["live.iop_packed"] = pvalues(pp * 1)
    net = Three(); pp = net.product()
    opt = torch.optim.SGD(net.parameters(), lr=0.5); (net.a * net.b).sum().backward(); opt.step()
    out["live.opt"] = pvalues(pp * 1)
    net = Three(); net += 0; pp = net.product()
    opt = torch.optim.SGD(net.parameters(), lr=0.5); (net.a * net.b).sum().backward(); opt.step()
    out["live.opt_packed"] = pvalues(pp * 1)
    net = Three(); pp = net.product(); net.set_param_config(operational=False, name="b")
    out["live.config"] = pvalues(pp * 2)
    net = Three(); net.set_param_config(operational=False, name="a"); pp = net.product()
    net.set_param_config(operational=False, name="b")
    out["live.config2"] = pvalues(pp * 2)
    net = Three(); pp = net.product(); net.set_param_config(operational=False, name="b")
    out["live.config.unary"] = []
    pp.unary_operator(lambda p, c: out["live.config.unary"].append(c.operational) or p)
    net = Three(); pp = net.product(); net.product_(pp * 3)
    out["live.product_self"] = values(net)
    out["live.product_self.pp"] = pvalues(pp)
    # non-bool config flags (1.1 tests truthiness)
    for opv in (0, 1, None, ""):
        net = Three()
        net.apply_param_config(lambda pid, c: setattr(c, "operational", opv), name="b")
        out["truthy.op.%r" % (opv,)] = values(net * 2)
    for clv in (0, None):
        net = Three()
        b = net.b
        net.apply_param_config(lambda pid, c: (setattr(c, "operational", False), setattr(c, "clone", clv)), name="b")
        out["truthy.clone.%r" % (clv,)] = (net * 2).b is b
    torch.manual_seed(0)
    net = Nested()
    c = net.block.clone()
    c.set_param_config(operational=False)
    out["subclone.root"] = values(net * 2)
    out["subclone.sub"] = values(c * 2)
    net = Nested()
    d = net.detach()
    d.block.set_param_config(operational=False)
    out["nested_detach.src"] = values(net * 2)
    out["nested_detach.der"] = values(d * 2)
    net = Nested()
    r = net.block * 2
    r.set_param_config(operational=False, name="lin")
    out["subop.root"] = values(net * 3)
    net = SeqNet()
    net.seq[0].set_param_config(operational=False)
    out["seq.inner"] = values(net * 2)
    net = SeqNet()
    net.set_param_config(operational=False, name="seq")
    out["seq.name"] = values(net * 2)
    net = SeqNet()
    net.set_param_config(False, True, "w")
    out["positional"] = values(net * 2)
    seen = []
    net.apply_param_config(lambda pid, c: seen.append(c.operational), "w")
    out["positional.apply"] = seen
    # configs after structural change of a derived result
    net = Three()
    r = net * 1
    net.set_param_config(operational=False, clone=False, name="b")
    out["later.same_b"] = (r * 2).b is r.b
    for cls in (Mixed, Big):
        for nonop in (None, "a", "l1"):
            torch.manual_seed(0)
            net = cls()
            if nonop is not None:
                try:
                    net.set_param_config(operational=False, name=nonop)
                except Exception:
                    continue
            torch.manual_seed(7)
            out["randn.%s.%s" % (cls.__name__, nonop)] = values(net.randn())
            torch.manual_seed(7)
            out["rand.%s.%s" % (cls.__name__, nonop)] = values(net.rand())
            torch.manual_seed(7)
            out["prandn.%s.%s" % (cls.__name__, nonop)] = pvalues(net.product().randn())
            net += 0
            torch.manual_seed(7)
            out["randn_packed.%s.%s" % (cls.__name__, nonop)] = values(net.randn())
    net = Mixed() + 1.5
    out["mixed.ops"] = values((net * 2 - 1) / 3 ** net)
    for name in ("enc", "dec", None):
        torch.manual_seed(0)
        net = AE()
        if name: net.set_param_config(operational=False, name=name)
        r = net * 2
        out["ae.%s" % name] = {k: v for k, v in values(r).items()}
        out["ae.%s.dec_w" % name] = r.dec.weight.detach().reshape(-1).tolist()
        out["ae.%s.tied" % name] = r.dec.weight is r.enc.weight
        out["ae.%s.ids" % name] = [net.get_param_id(p) for p in (net.enc.weight, net.dec.weight, net.dec.bias)]
    net = Three(); net += 0; d = net.detach(); d += 1; net *= 2; d -= 0.5
    out["alias.1.net"] = values(net); out["alias.1.d"] = values(d)
    net = Three(); d = net.detach(); d *= 3; net += 1; d += d
    out["alias.2.net"] = values(net); out["alias.2.d"] = values(d)
    net = Three(); d = net.detach(); net += 1; d += 0; net *= 2; d.product_(d.product() + 1); net /= 2
    out["alias.3.net"] = values(net); out["alias.3.d"] = values(d)
    net = Three(); net.set_param_config(operational=False, clone=False, name="b")
    c = net.clone(); c += 1; c.product_(c.product() * 0); net *= 2
    out["alias.4.net"] = values(net); out["alias.4.c"] = values(c)
    # optimizer on d, in-place ops on net
    net = Three(); d = net.detach(); opt = torch.optim.SGD(d.parameters(), lr=0.1, momentum=0.5)
    for _ in range(3):
        opt.zero_grad(); (d.a * d.b * d.c).sum().backward(); opt.step(); net += 0.25; d *= 0.9
    out["alias.opt.net"] = values(net)
    net = Three()
    (net.a * net.b * net.c).sum().backward()
    out["grad.unary"] = err(lambda: net.product().unary_operator(lambda p, c: nn.Parameter(p - 0.1 * p.grad)).module())
    try:
        out["grad.unary.v"] = values(net.product().unary_operator(lambda p, c: nn.Parameter(p - 0.1 * p.grad)).module())
    except Exception:
        out["grad.unary.v"] = None
    kinds = []
    net.product().unary_operator(
        lambda p, c: kinds.append([type(p).__name__, p.requires_grad, p.grad is not None, p.is_leaf]) or p)
    out["fn.arg"] = kinds
    kinds = []
    net.product().binary_operator(net.clone().product(), lambda p, q, c: kinds.append(
        [type(p).__name__, type(q).__name__, p.grad is not None, q.grad is not None]) or p)
    out["fn.arg2"] = kinds
    out["vec.same_shape"] = err(lambda: net + torch.tensor([1., 2.]))
    torch.manual_seed(0)
    net = Nested()
    out["sub.before"] = values(net)
    out["sub.mul"] = values(net.block * 2)
    net.block += 1
    out["sub.iadd.net"] = values(net)
    net = Nested()
    net.block.product_(net.block.product() * 0)
    out["sub.product_.net"] = values(net)
    net = Nested()
    b = net.block
    out["sub.unary_count"] = []
    net.block.product().unary_operator(lambda p, c: out["sub.unary_count"].append(list(p.shape)) or p)
    net = Three(); net += 0
    (net.a * net.b * net.c).sum().backward()
    out["grad.packed"] = values(net.product().unary_operator(lambda p, c: nn.Parameter(p - 0.1 * p.grad)).module())
    net = Three(); net.set_param_config(operational=False, name="a")
    d = copy.deepcopy(net)
    out["deep.d"] = values(d * 2)
    d.set_param_config(operational=False, name="c")
    out["deep.net"] = values(net * 2)
    out["deep.same_a"] = d.a is net.a
    net = Three(); net.set_param_config(operational=False, name="a")
    n2 = Three(); n2.load_state_dict(net.state_dict())
    out["sd.fresh"] = values(n2 * 2)
    net = Three(); net.set_param_config(operational=False, clone=False, name="a")
    c = copy.copy(net)
    out["copy.net"] = values(c * 2)
    out["_file"] = nytorch.__file__
    return out


if __name__ == "__main__":
    print(json.dumps(run()))
'''


def _run(path: Path) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(path)}
    done = subprocess.run([sys.executable, "-c", SCENARIOS], capture_output=True, text=True, env=env,
                          cwd="/", timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    assert Path(result.pop("_file")).resolve().is_relative_to(path.resolve())  # really that nytorch
    return result


@pytest.fixture(scope="module")
def ours() -> dict[str, Any]:
    return _run(ROOT)


@pytest.fixture(scope="module")
def reference() -> dict[str, Any]:
    if not (NYTO11 / "nytorch" / "module.py").exists():
        pytest.skip(f"reference nytorch 1.1 not installed at {NYTO11}")
    return _run(NYTO11)


def _close(a: Any, b: Any) -> bool:
    return json_close(a, b, rtol=1e-5)


# Deliberate differences the README's migration section (or its Semantics) states: key -> README wording.
DOCUMENTED: dict[str, str] = {
    # a custom operator returning the parameter as is: only clone=False keeps the object
    "binary.False.True.same_b": "Only a non-operational `clone=False`",
    "frozen.unary": "made a frozen parameter trainable",
    # clone_from gives a clone=False parameter a fresh Parameter (1.1 wrote into self's)
    "cfg.clone_from.same_b.False.False": "gives a `clone=False` parameter a fresh Parameter",
    # models of another class: TypeError; 1.1 asserted
    "err.other_class": "models of another class) raise `TypeError`",
    "err.product_other_class": "models of another class) raise `TypeError`",
    # ``dec.weight = enc.weight`` on plain submodules: tied here, an untied stale copy in 1.1's results
    **{f"ae.{name}{what}": "stays tied in results" for name in ("enc", "None")
       for what in ("", ".dec_w", ".tied")},
    **{f"ae.dec{what}": "stays tied in results" for what in (".dec_w", ".tied")},
    **{f"ae.{name}.ids": "not 1.1's registration order" for name in ("enc", "dec", "None")},
    # documented in the migration section since the lead added the sentences this file's author reported
    "replaced_param": "a replaced or re-added parameter or submodule",
    "readded_param": "also after `del net.b`",
    "tags.detach": "keep custom config attributes",
    "backward_after_iop": "a `backward()` through a graph built",
    "grad_after_iop": "where 1.1 silently used the old values",
    "vec.tensor1": "Only numbers and 0-dim tensors are scalar operands",
    "vec.same_shape": "1.1 broadcast any tensor",
    "clone_from.less": "Other names or shapes raise `StructureError`",
    "ae.dec": "it configures that shared Parameter",
    "sub.iadd.net": "act on `net.block`'s",
    "sub.product_.net": "`net.block.product_(p)`",
    "sub.unary_count": "its `unary_operator` visited all of them",
}
# Operands 1.1 refused with an ``assert`` (so no 1.1 program relies on them) and this nytorch accepts:
# a model and a Particle of its class mix both ways, as the README's error table implies
# ("a model (or Particle) of another class"); values are checked in ``test_models_and_products_mix``.
ACCEPTED_HERE: dict[str, str] = {
    "err.product_plus_module": "net.product() + net",
    "err.module_plus_product": "net + net.product()",
    "err.binary_op_module": "net.product().binary_operator(net, fn)",
    "iop.product": "net += net.product()",
}
# Deliberate differences the README does not state yet (reported with the sentence to add): key -> what.
UNDOCUMENTED: dict[str, str] = {}


def test_same_scenarios_ran(ours: dict[str, Any], reference: dict[str, Any]) -> None:
    assert set(ours) == set(reference)
    assert not (set(DOCUMENTED) | set(UNDOCUMENTED) | set(ACCEPTED_HERE)) - set(reference)


@pytest.mark.parametrize("prefix", ["op.", "prod.", "iop.", "product_.", "randn.", "prandn.", "rand.", "prand.",
                                    "unary", "binary.", "cfg.", "share.", "tags.", "nested.", "twice.", "tied.",
                                    "opt.", "err.", "self.", "frozen.", "der", "subprod", "name_err.", "gid.",
                                    "new_param", "p.", "clone_from.", "live.", "truthy.", "subclone.",
                                    "nested_detach.", "subop.", "seq.", "positional", "later.", "randn_packed.",
                                    "mixed.", "ae.", "alias.", "grad.", "fn.", "vec.", "sub.", "deep.", "sd.",
                                    "copy."])
def test_matches_nytorch_11(ours: dict[str, Any], reference: dict[str, Any], prefix: str) -> None:
    keys = [k for k in reference if k.startswith(prefix)]
    assert keys
    mismatched = {k: (ours[k], reference[k]) for k in keys
                  if k not in {**DOCUMENTED, **UNDOCUMENTED, **ACCEPTED_HERE} and not _close(ours[k], reference[k])}
    assert not mismatched, mismatched


def test_known_differences_are_real(ours: dict[str, Any], reference: dict[str, Any]) -> None:
    # a listed difference that 1.1 and this nytorch no longer show should leave the lists
    same = [k for k in (*DOCUMENTED, *UNDOCUMENTED, *ACCEPTED_HERE) if _close(ours[k], reference[k])]
    assert not same, same


def test_documented_differences_are_in_the_readme() -> None:
    readme = (ROOT / "README.md").read_text()
    missing = {k: phrase for k, phrase in DOCUMENTED.items() if phrase not in readme}
    assert not missing, missing


# -- this nytorch against plain torch, with or without the reference ------------------------------------
A, B, C = [1.0, 2.0], [3.0, -4.0], [0.5, 6.0]
OTHER = [3.0, 3.0]
SCALAR_OPS = {"add_s": lambda x: x + 2, "radd_s": lambda x: 2 + x, "sub_s": lambda x: x - 2,
              "rsub_s": lambda x: 2 - x, "mul_s": lambda x: x * 3, "rmul_s": lambda x: 3 * x,
              "div_s": lambda x: x / 4, "rdiv_s": lambda x: 4 / x, "pow_s": lambda x: x ** 2,
              "rpow_s": lambda x: 2 ** x, "neg": lambda x: -x, "pos": lambda x: +x, "clone": lambda x: x.clone(),
              "tensor0": lambda x: x * 2}
MODEL_OPS = {"add_m": lambda x, y: x + y, "sub_m": lambda x, y: x - y, "mul_m": lambda x, y: x * y,
             "div_m": lambda x, y: x / y, "pow_m": lambda x, y: x ** y, "radd_m": lambda x, y: y + x,
             "rsub_m": lambda x, y: y - x}


def _expected(key: str) -> dict[str, list[float]]:
    # per tensor, in plain torch: ``b`` is non-operational, so it keeps its values
    a, c, other = torch.tensor(A), torch.tensor(C), torch.tensor(OTHER)
    if key in SCALAR_OPS:
        fa, fc = SCALAR_OPS[key](a), SCALAR_OPS[key](c)
    else:
        fa, fc = MODEL_OPS[key](a, other), MODEL_OPS[key](c, other)
    return {"a": fa.tolist(), "b": B, "c": fc.tolist()}


@pytest.mark.parametrize("clone", [True, False])
@pytest.mark.parametrize("key", [*SCALAR_OPS, *MODEL_OPS])
def test_non_operational_parameter_through_every_operator(ours: dict[str, Any], key: str, clone: bool) -> None:
    base = f"op.False.{clone}.{key}"
    assert _close(ours[base], _expected(key))
    assert ours[base + ".same_b"] is (not clone)  # clone=False: the very same Parameter
    assert ours[base + ".rg"] == [True, True, True]
    if key != "pos":
        assert _close(ours["prod." + base], _expected(key))
        assert ours["prod." + base + ".same_b"] is (not clone)


@pytest.mark.parametrize("clone", [True, False])
@pytest.mark.parametrize("op", ["+=", "-=", "*=", "/=", "**="])
def test_in_place_operators_keep_the_parameters_and_skip_non_operational(
        ours: dict[str, Any], op: str, clone: bool) -> None:
    fn = {"+=": torch.add, "-=": torch.sub, "*=": torch.mul, "/=": torch.div, "**=": torch.pow}[op]
    for rhs, other in (("2", torch.tensor(2.0)), ("other", torch.tensor(OTHER))):
        key = f"iop.False.{clone}.{op}.{rhs}"
        expected = {"a": fn(torch.tensor(A), other).tolist(), "b": B, "c": fn(torch.tensor(C), other).tolist()}
        assert _close(ours[key], expected), key
        assert ours[key + ".same"]


@pytest.mark.parametrize("op", ["+=", "-=", "*=", "/=", "**="])
def test_in_place_operator_with_itself(ours: dict[str, Any], op: str) -> None:
    fn = {"+=": torch.add, "-=": torch.sub, "*=": torch.mul, "/=": torch.div, "**=": torch.pow}[op]
    a, b, c = torch.tensor(A), torch.tensor(B), torch.tensor(C)
    both = {"a": fn(a, a).tolist(), "b": fn(b, b).tolist(), "c": fn(c, c).tolist()}
    assert _close(ours[f"self.{op}.True.True"], both)
    for clone in (True, False):
        assert _close(ours[f"self.{op}.False.{clone}"], {"a": fn(a, a).tolist(), "b": B, "c": fn(c, c).tolist()})


@pytest.mark.parametrize("clone", [True, False])
def test_randn_and_rand_draw_only_operational_parameters_in_order(ours: dict[str, Any], clone: bool) -> None:
    # 1.1 drew ``randn_like`` per operational parameter, in order: the same stream here
    for key, seed, draw in (("randn", 3, torch.randn), ("rand", 4, torch.rand)):
        torch.manual_seed(seed)
        expected = {"a": draw(2).tolist(), "b": B, "c": draw(2).tolist()}
        assert _close(ours[f"{key}.False.{clone}"], expected)
        assert _close(ours[f"p{key}.False.{clone}"], expected)
    assert ours[f"randn.False.{clone}.same_b"] is (not clone)


def test_optimizers_holding_parameters_follow_in_place_operators(ours: dict[str, Any]) -> None:
    # the scenario's loop by hand, on plain tensors, with the same torch.optim optimizers
    for name, kwargs in (("SGD", {"momentum": 0.9}), ("Adam", {})):
        a, b, c = (torch.nn.Parameter(torch.tensor(v)) for v in (A, B, C))
        opt = getattr(torch.optim, name)([a, b, c], lr=0.1, **kwargs)
        for _ in range(3):
            opt.zero_grad()
            (a * b * c).sum().backward()
            opt.step()
            with torch.no_grad():
                for p in (a, b):  # ``c`` is non-operational (clone=False)
                    p.mul_(0.5)
                    p.add_(p.clone())
                    p.sub_(0.1)
        assert _close(ours[f"opt.{name}"], {"a": a.tolist(), "b": b.tolist(), "c": c.tolist()}), name


def test_configs_by_name_follow_objects(ours: dict[str, Any]) -> None:
    # a submodule registered twice: either name freezes the one Linear, which stays one module
    for name in ("first", "second"):
        assert ours[f"twice.{name}.flags"] == [False, False, True, True]
        assert ours[f"twice.{name}.tied"]
    assert ours["twice.last.flags"] == [True, True, False, False]
    # a Parameter registered under two names: either name reaches its one config
    for name in ("w1", "w2"):
        assert _close(ours[f"tied.{name}"], {"w1": [1.0, 2.0], "w3": [6.0, 7.0]})
        assert ours[f"tied.{name}.ids"] == [0] and ours[f"tied.{name}.tied"]
    assert ours["tied.ids"] == [0, 0, 1]
    assert ours["nested.ids.head"] == [2, 3]


def test_configs_shared_by_derived_models_copied_by_detach(ours: dict[str, Any]) -> None:
    doubled = {"a": [2.0, 4.0], "b": [6.0, -8.0], "c": [1.0, 12.0]}
    for how in ("clone", "clone_from", "op", "product"):
        assert _close(ours[f"share.{how}.src"], {**doubled, "a": A}), how  # set on the derived model
        # set on the source afterwards: reaches the derived model too
        assert _close(ours[f"share.{how}.back"], {"a": A, "b": doubled["b"], "c": C}), how
    assert _close(ours["share.detach.src"], doubled)  # detach: configs of its own, both ways
    assert _close(ours["share.detach.der"], {**doubled, "a": A})
    assert _close(ours["share.detach.back"], {**doubled, "a": A})


def test_name_errors() -> None:
    import nytorch as nyto
    from torch import nn

    class WithBuf(nyto.NytoModule):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.ones(2))
            self.register_buffer("buf", torch.ones(2))
            self.register_parameter("none", None)

    net = WithBuf()
    for name in ("buf", "none", "missing", ""):
        with pytest.raises(ValueError, match=f"set_param_config: WithBuf has no submodule or parameter named '{name}'"):
            net.set_param_config(operational=False, name=name)
    with pytest.raises(ValueError, match=r"get_param_id: the given parameter \(\(2,\)\) is not a parameter"):
        net.get_param_id(net.buf)


def test_models_and_products_mix() -> None:
    import nytorch as nyto
    from torch import nn

    class Two(nyto.NytoModule):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Parameter(torch.tensor([1.0, 2.0]))
            self.b = nn.Parameter(torch.tensor([3.0, -4.0]))

    net = Two()
    net.set_param_config(operational=False, name="b")
    twice = {"a": [2.0, 4.0], "b": [3.0, -4.0]}
    def vals(m: Any) -> dict[str, list[float]]:
        return {n: p.detach().tolist() for n, p in m.named_parameters()}
    assert vals(net + net.product()) == twice
    assert vals((net.product() + net).module()) == twice
    sub = net.product().binary_operator(net, lambda p, q, conf: p - q if conf.operational else p).module()
    assert vals(sub) == {"a": [0.0, 0.0], "b": [3.0, -4.0]}
    weight = net.a
    net += net.product()
    assert vals(net) == twice and net.a is weight


def test_a_product_is_a_live_view_of_its_model(ours: dict[str, Any]) -> None:
    # 1.1's ParamProduct held the Parameter objects and read configs when used: so does a Particle
    a, b, c = torch.tensor(A), torch.tensor(B), torch.tensor(C)
    plus_one = {"a": (a + 1).tolist(), "b": (b + 1).tolist(), "c": (c + 1).tolist()}
    assert _close(ours["live.iop"], plus_one) and _close(ours["live.iop_packed"], plus_one)
    assert _close(ours["live.iop2"], {"a": (a * 2 + 1).tolist(), "b": (b * 2 + 1).tolist(), "c": (c * 2 + 1).tolist()})
    stepped = {"a": (a - 0.5 * b).tolist(), "b": (b - 0.5 * a).tolist(), "c": C}  # SGD on sum(a * b)
    assert _close(ours["live.opt"], stepped) and _close(ours["live.opt_packed"], stepped)
    assert _close(ours["live.config"], {"a": (a * 2).tolist(), "b": B, "c": (c * 2).tolist()})
    assert _close(ours["live.config2"], {"a": A, "b": B, "c": (c * 2).tolist()})
    assert ours["live.config.unary"] == [True, False, True]
    tripled = {"a": (a * 3).tolist(), "b": (b * 3).tolist(), "c": (c * 3).tolist()}
    assert _close(ours["live.product_self"], tripled) and _close(ours["live.product_self.pp"], tripled)


def test_config_flags_are_read_by_truthiness(ours: dict[str, Any]) -> None:
    # 1.1 tested ``if pconf.operational`` / ``if pconf.clone``; set through apply_param_config, any value works
    a, b, c = torch.tensor(A), torch.tensor(B), torch.tensor(C)
    for value, operational in (("0", False), ("1", True), ("None", False), ("''", False)):
        expected = {"a": (a * 2).tolist(), "b": (b * 2).tolist() if operational else B, "c": (c * 2).tolist()}
        assert _close(ours[f"truthy.op.{value}"], expected), value
    assert ours["truthy.clone.0"] and ours["truthy.clone.None"]


def test_name_reaches_a_parameter_tied_across_plain_submodules(ours: dict[str, Any]) -> None:
    enc_w = ours["ae.None.dec_w"]  # enc.weight doubled, the one tensor both submodules hold
    assert ours["ae.dec.tied"] and ours["ae.dec.dec_w"] == [x / 2 for x in enc_w]  # non-operational: as it was
    assert ours["ae.dec.ids"] == [0, 0, 2]


def test_a_submodule_product_and_in_place_operator_stay_in_the_submodule(ours: dict[str, Any]) -> None:
    before = ours["sub.before"]
    block = {k: v for k, v in before.items() if k.startswith("block.")}
    assert _close(ours["sub.mul"], {k[len("block."):]: [2 * x for x in v] for k, v in block.items()})
    assert _close(ours["sub.iadd.net"], {**{k: [x + 1 for x in v] for k, v in block.items()},
                                         "head.weight": before["head.weight"], "head.bias": before["head.bias"]})
    assert ours["sub.unary_count"] == [[2, 2], [2]]
    zeroed = ours["sub.product_.net"]
    assert all(x == 0 for k in ("block.lin.weight", "block.lin.bias") for x in zeroed[k])
    assert any(x != 0 for x in zeroed["head.weight"] + zeroed["head.bias"])


def test_custom_operators_get_the_parameters_with_their_grads(ours: dict[str, Any]) -> None:
    # a 1.1 idiom: an SGD step as a custom operator reading ``p.grad``
    a, b, c = (torch.tensor(v, requires_grad=True) for v in (A, B, C))
    (a * b * c).sum().backward()
    stepped = {n: (t - 0.1 * t.grad).tolist() for n, t in (("a", a), ("b", b), ("c", c))}
    assert _close(ours["grad.unary.v"], stepped) and _close(ours["grad.packed"], stepped)
    assert ours["fn.arg"] == [["Parameter", True, True, True]] * 3

"""The issues' speed targets, judged against the rows of one run (ratios only, never seconds across runs).

The performance issue (4) sets most of them; the swarm issue sets those of ``bench_swarm``.
``verdicts(table)`` answers, for every target whose rows the run has, what was measured
and whether it meets the target; ``python -m benchmarks`` prints them after the table and
``--results`` writes them into ``RESULTS.md``.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple, Optional

Row = dict[str, Any]


class Target(NamedTuple):
    """``measured <= at_most`` for a ratio to the floor, or ``speedup >= at_least`` over another implementation."""

    text: str
    suite: str
    workload: str
    size: str
    implementation: str
    at_most: Optional[float] = None  # a ratio to the floor
    at_least: Optional[float] = None  # how many times faster than ``than`` (quotient of ratios to the floor)
    than: str = ""


class Verdict(NamedTuple):
    target: Target
    measured: float
    met: bool

    def line(self) -> str:
        """``met  Particle a + b, deep-narrow: 1.12 (target <= 1.15)``.

        Two decimals, or more where two would show a value as the target itself (1.503 against 1.5).

        >>> target = Target("t", "s", "w", "z", "i", at_most=1.5)
        >>> Verdict(target, 1.503, False).line(), Verdict(target, 1.5, True).line()
        ('MISS  t: 1.503 (target <= 1.5)', 'met   t: 1.50 (target <= 1.5)')
        """
        bound = self.target.at_most if self.target.at_most is not None else self.target.at_least
        digits = 2
        while digits < 6 and round(self.measured, digits) == bound and self.measured != bound:
            digits += 1
        shown = f"{self.measured:.{digits}f}" + ("" if self.target.at_most is not None else "x faster")
        limit = f"<= {bound:g}" if self.target.at_most is not None else f">= {bound:g}x faster"
        return f"{'met ' if self.met else 'MISS'}  {self.target.text}: {shown} (target {limit})"


def _ratio_targets() -> list[Target]:
    found = []
    # "Particle/functional ops" and "NytoModule ops": every one-pass operation the suite times (bench_core's
    # row names); the three-pass expression and the in-place EMA update have targets of their own below
    one_pass = (
        ("a + b", "a + b", ("Particle p + q", "functional nf.add", "NytoModule a + b")),
        ("randn", "randn", ("Particle randn", "functional nf.randn_like", "NytoModule randn")),
        ("clone", "clone", ("Particle clone", "functional nf.clone", "NytoModule clone")),
    )
    for size, particle, module in (("deep-narrow", 1.15, 1.5), ("wide", 1.15, 1.1), ("many-small", 1.5, None)):
        for text, workload, (ours_particle, ours_functional, ours_module) in one_pass:
            found.append(Target(f"Particle {text}, {size}", "bench_core", workload, size, ours_particle, particle))
            found.append(Target(f"functional {text}, {size}", "bench_core", workload, size, ours_functional,
                                particle))
            if module is not None:
                found.append(Target(f"NytoModule {text}, {size}", "bench_core", workload, size, ours_module, module))
    for implementation in ("Particle", "NytoModule", "functional"):  # every API of ours (bench_core's row names)
        found.append(Target(f"{implementation} 0.9 * (a - b) + a, deep-narrow", "bench_core", "0.9 * (a - b) + a",
                            "deep-narrow", implementation, 2.0))
    found += [
        Target("Particle ema.lerp_(model, 0.001), many-small", "bench_core", "lerp_ (EMA, in place)", "many-small",
               "Particle ema.lerp_", 1.5),
        Target("its equivalent merge.EMA.update(), many-small", "bench_merge", "EMA update",
               "many-small (200 x 64x64)", "nytorch EMA.update()", 1.5),
        Target("momentum example, 100 epochs", "bench_core", "momentum example, 100 epochs", "iris MLP",
               "NytoModule (seed example)", 1.5),
    ]
    for size in ("many-small", "deep-narrow", "wide", "resnet18"):  # bench_memory.SIZES
        for implementation in ("NytoModule a + b", "Particle p + q", "functional nf.add"):
            found.append(Target(f"memory of {implementation}, {size}", "bench_memory", "memory of a + b", size,
                                implementation, 1.1))
    return found


#: Every target the suite measures: issue 4's in its order, then the swarm issue's.
TARGETS: list[Target] = _ratio_targets() + [
    Target("iris NytoModule net + net vs nytorch 1.1", "bench_core", "a + b", "iris MLP", "NytoModule a + b",
           at_least=5.0, than="nytorch 1.1 NytoModule"),
    Target("iris NytoModule net + net vs tensordict td + td", "bench_core", "a + b", "iris MLP", "NytoModule a + b",
           at_least=2.0, than="tensordict td + td"),
    Target("swarm forward, P = 64", "bench_swarm", "swarm forward", "P=64 4-32-32-3", "Swarm: swarm(x)", 1.5),
    Target("swarm forward vs a Python loop of the 64 modules", "bench_swarm", "swarm forward", "P=64 4-32-32-3",
           "Swarm: swarm(x)", at_least=3.0, than="Python loop of 64 modules"),
    Target("accelerated-PSO update, P = 64", "bench_swarm", "APSO update", "P=64 n=1315",
           "nytorch algorithms.apso", 1.3),
    # against the faster of nytorch 1.1's two forms (products; its modules are ~3x slower still)
    Target("accelerated-PSO update vs nytorch 1.1", "bench_swarm", "APSO update", "P=64 n=1315",
           "nytorch algorithms.apso", at_least=50.0, than="nytorch 1.1 products (subprocess)"),
]


def verdicts(table: Sequence[Row]) -> list[Verdict]:
    """The verdict on every target whose rows are in ``table``.

    >>> rows = [{"suite": "bench_core", "workload": "a + b", "size": "wide", "implementation": "Particle p + q",
    ...          "median_us": 20.0, "ratio_to_floor": 0.9}]
    >>> [verdict.line() for verdict in verdicts(rows)]
    ['met   Particle a + b, wide: 0.90 (target <= 1.15)']
    """
    rows = {(row.get("suite", ""), row["workload"], row.get("size", ""), row["implementation"]): row for row in table}
    found = []
    for target in TARGETS:
        row = rows.get((target.suite, target.workload, target.size, target.implementation))
        if row is None:
            continue
        if target.at_most is not None:
            found.append(Verdict(target, row["ratio_to_floor"], row["ratio_to_floor"] <= target.at_most))
            continue
        other = rows.get((target.suite, target.workload, target.size, target.than))
        if other is None or not row["ratio_to_floor"]:
            continue
        # Each ratio is to a floor measured alongside it, so their quotient holds even when ``than`` ran
        # in another process at another moment (nytorch 1.1 does), under another load of the machine.
        speedup = other["ratio_to_floor"] / row["ratio_to_floor"]
        found.append(Verdict(target, speedup, speedup >= target.at_least))  # type: ignore[operator]
    return found


def tick(workload: str, size: str, implementation: str) -> Optional[float]:
    """The ratio target drawn across a bar of ``plot``, if there is one (``bench_core`` rows).

    >>> tick("a + b", "wide", "NytoModule a + b")
    1.1
    """
    for target in TARGETS:
        if (target.suite, target.workload, target.size, target.implementation) == (
                "bench_core", workload, size, implementation) and target.at_most is not None:
            return target.at_most
    return None

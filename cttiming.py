"""Ratios of timings that hold under a changing load: interleaved pairs, their spread, and the
pairs a load change disturbed.

A ratio of two rates measured minutes apart (a matmul peak at the start, a training step later)
is as much a ratio of two machine loads as of two workloads: on a shared 2-core machine the same
benchmark printed a bfloat16 training speed-up of 1.01x and 1.58x, and efficiencies above 1
(issue 27). Here both sides of a ratio are timed in turn, A, B, A, B, ... (:func:`interleave`), so
that each pair (A_i, B_i) shares the load of the moment; the ratio is taken within each pair and
its min / median / max over the pairs is its spread (:func:`ratio`).

Each timing also records how many cores *other* processes kept busy while it ran
(:class:`CpuMeter`: the busy jiffies of ``/proc/stat``, guest steal included, minus this
process's own CPU time from :func:`os.times`, over the wall time). A pair whose two halves saw
that load differ by more than :data:`DISTURBED_CORES` is *disturbed* — the load changed within
the pair — and is left out of the figure; a ratio with fewer clean pairs than disturbed ones is
marked ``disturbed`` as a whole. An efficiency (MFU: counted FLOP/s over a matmul's FLOP/s) above
1 cannot be true and is marked ``invalid`` with its reason, never given as a result.

Which ratios depend on the load itself, even when interleaved: those whose two sides use the
cores differently. bfloat16 vs float32 (AMX / AVX-512 BF16 units vs FMA units, half the memory
traffic) and loader vs training (tf.data's parallel decode and small ops vs large convolutions)
slow down by different factors when another job takes a core, so under load they measure the
ratio *under that load*, even a steady one: such a ratio (``ratio(..., load_dependent=True)``)
is marked disturbed whenever others kept more than DISTURBED_CORES busy during its timings
(a steady busy loop moved the cold loader ratio from 1.31 to 1.97 without changing within a
pair), and the printed ``others`` load says which load it was. MFU is one of them: the matmul
peak scales over every core, a training or inference step does not (reorders, small ops, memory
traffic), so a job holding one core slows them by different factors. Measured on a 2-core
Sapphire Rapids (2026-12-06, ``make bench BENCH_FLAGS='$(BENCH_RATIOS)'``, a busy loop beside it
vs idle): bfloat16 training MFU 0.52 [0.41-0.57] vs 0.37 [0.35-0.43] idle, bfloat16 inference
MFU 0.85 [0.82-0.93] vs 0.96 [0.93-0.99], no pair disturbed. numpy only (no TensorFlow).
"""

from __future__ import annotations

import math
import os
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Optional

DISTURBED_CORES = 0.35  # others' load differing by more than this within a pair: disturbed
MIN_SAMPLE_S = 0.25  # shorter calls are repeated: others' load is counted in 10 ms clock ticks


@dataclass(frozen=True)
class Sample:
    """One timed call: wall ``seconds`` and ``others``, the cores other processes kept busy
    meanwhile (None where ``/proc/stat`` cannot be read)."""

    seconds: float
    others: Optional[float] = None


class CpuMeter:
    """Busy CPU seconds of the whole machine and of this process, to tell others' load."""

    def __init__(self, stat_path: str = "/proc/stat") -> None:
        self.stat_path = stat_path
        self.hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

    def machine_busy_s(self) -> Optional[float]:
        """Busy seconds of all CPUs since boot (user, nice, system, irq, softirq, steal)."""
        try:
            with open(self.stat_path) as f:
                fields = f.readline().split()
        except OSError:
            return None
        if not fields or fields[0] != "cpu" or len(fields) < 9:
            return None
        user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, fields[1:9])
        return (user + nice + system + irq + softirq + steal) / self.hz

    @staticmethod
    def own_s() -> float:
        t = os.times()
        return t.user + t.system

    def time(self, fn: Callable[[], object]) -> Sample:
        """Run ``fn`` once: its wall time and the cores others kept busy meanwhile."""
        busy0, own0 = self.machine_busy_s(), self.own_s()
        t0 = time.perf_counter()
        fn()
        wall = time.perf_counter() - t0
        busy1, own1 = self.machine_busy_s(), self.own_s()
        if busy0 is None or busy1 is None or wall <= 0:
            return Sample(wall)
        others = ((busy1 - busy0) - (own1 - own0)) / wall
        return Sample(wall, max(0.0, others))


def interleave(fns: dict[str, Callable[[], object]], rounds: int,
               meter: Optional[CpuMeter] = None, min_s: float = MIN_SAMPLE_S
               ) -> dict[str, list[Sample]]:
    """Time every function of ``fns`` once per round, in turn (A, B, A, B, ...), ``rounds``
    rounds; warm-up (tracing, compiling) is the caller's. A function faster than ``min_s`` is
    called as many times in a row as fill ``min_s`` (from one calibration call), so that
    others' load, counted in clock ticks, is known to a few hundredths of a core. Returns
    name -> one Sample per round, ``seconds`` per call."""
    meter = meter or CpuMeter()
    calls = {}
    for name, fn in fns.items():
        t0 = time.perf_counter()
        fn()
        calls[name] = max(1, math.ceil(min_s / max(time.perf_counter() - t0, 1e-6)))
    out: dict[str, list[Sample]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            k = calls[name]
            s = meter.time(fn if k == 1 else lambda fn=fn, k=k: [fn() for _ in range(k)])
            out[name].append(Sample(s.seconds / k, s.others))
    return out


def ratio(num: list[Sample], den: list[Sample], num_work: float = 1.0, den_work: float = 1.0,
          efficiency: bool = False, threshold: float = DISTURBED_CORES,
          load_dependent: bool = False) -> dict:
    """Rate ratio ``(num_work / num.seconds) / (den_work / den.seconds)`` within each pair
    ``(num[i], den[i])``, with its spread over the clean pairs.

    A pair is disturbed when both halves know others' load and it differs by more than
    ``threshold`` cores. ``status``: ``ok``; ``disturbed`` (no more clean pairs than disturbed
    ones, or ``load_dependent`` and others kept more than ``threshold`` cores busy during any
    timing; ``value`` is then the median, shown only as disturbed); ``invalid``
    (``efficiency`` and the value above 1: ``value`` None, ``reason`` says why).
    """
    if not num or len(num) != len(den):
        raise ValueError(f"need pairs: {len(num)} numerator and {len(den)} denominator timings")
    per_pair, disturbed = [], []
    for a, b in zip(num, den):
        per_pair.append((num_work / a.seconds) / (den_work / b.seconds))
        disturbed.append(a.others is not None and b.others is not None
                         and abs(a.others - b.others) > threshold)
    clean = [r for r, d in zip(per_pair, disturbed) if not d]
    use = clean if clean else per_pair
    loads = [s.others for s in (*num, *den) if s.others is not None]
    out = {"value": statistics.median(use), "min": min(use), "median": statistics.median(use),
           "max": max(use), "pairs": len(per_pair), "disturbed_pairs": sum(disturbed),
           "per_pair": per_pair, "others_cores": (round(min(loads), 2), round(max(loads), 2))
           if loads else None, "status": "ok", "reason": "", "load_dependent": load_dependent}
    if len(clean) <= sum(disturbed):
        out.update(status="disturbed", reason=f"the load changed within {sum(disturbed)} of "
                   f"{len(per_pair)} pairs (others' CPU use differed by > {threshold} cores)")
    elif load_dependent and loads and max(loads) > threshold:
        out.update(status="disturbed", reason=(
            f"this ratio depends on the load itself and other processes kept up to "
            f"{max(loads):.1f} cores busy: it is the ratio under that load, not an idle one"))
    if efficiency and out["value"] > 1:
        out.update(status="invalid", value=None, reason=(
            f"efficiency {out['median']:.2f} > 1: the work counted runs faster than the peak "
            "timed beside it, so that peak is not this machine's peak for these kernels (or "
            "the FLOP count is too high)"))
    return out


def rate(samples: list[Sample], work: float = 1.0) -> dict:
    """Median, min and max of ``work / seconds`` over ``samples``."""
    rates = [work / s.seconds for s in samples]
    return {"median": statistics.median(rates), "min": min(rates), "max": max(rates),
            "median_s": statistics.median(s.seconds for s in samples), "repeats": len(rates)}


def describe(name: str, r: dict, nd: int = 2) -> str:
    """One line: ``name median [min-max] over n pairs (k disturbed), others' load``; an invalid
    ratio prints its reason instead of a value."""
    load = r.get("others_cores")
    tail = f"; others {load[0]:.1f}-{load[1]:.1f} cores" if load else ""
    dep = " (depends on the load itself)" if r.get("load_dependent") else ""
    if r["status"] == "invalid":
        return f"{name}: INVALID, {r['reason']}{tail}"
    head = (f"{name}: {r['value']:.{nd}f} [{r['min']:.{nd}f}-{r['max']:.{nd}f}] over "
            f"{r['pairs']} pairs ({r['disturbed_pairs']} disturbed){tail}{dep}")
    return head + (f"; DISTURBED: {r['reason']}" if r["status"] == "disturbed" else "")

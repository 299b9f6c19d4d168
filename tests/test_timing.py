"""cttiming: ratios from interleaved timings hold across a load step; a start-only peak does not.

Synthetic timing series (no clock involved): a matmul "peak" of 100 GFLOP and a section of
50 GFLOP whose true efficiency is 0.85; another job takes one of the two cores half-way through,
halving both rates. No timed assertions."""

import numpy as np
import pytest

import cttiming
from cttiming import Sample

PEAK, TRUE_MFU, WORK_PEAK, WORK_SEC = 200.0, 0.85, 100.0, 50.0


def series(rounds=10, step_at=5.5, before=0.0, after=1.0, noise=0.03, seed=0, known=True):
    """(peak samples, section samples) timed A, B, A, B ...; the load goes from ``before`` to
    ``after`` other cores at round ``step_at`` (x.5: between A and B of that round)."""
    rng = np.random.default_rng(seed)
    peak, sec = [], []
    for i in range(rounds):
        for which, work, eff, out in (("A", WORK_PEAK, 1.0, peak), ("B", WORK_SEC, TRUE_MFU, sec)):
            t = i + (0.0 if which == "A" else 0.5)
            others = after if t >= step_at else before
            speed = PEAK * eff / (1.0 + others)  # another busy core halves a 2-core rate
            seconds = work / speed * (1 + noise * rng.standard_normal())
            out.append(Sample(seconds, others if known else None))
    return peak, sec


@pytest.mark.parametrize("before,after", [(0.0, 1.0), (1.0, 0.0)])
def test_interleaved_ratio_survives_a_load_step_a_start_only_peak_does_not(before, after):
    peak, sec = series(before=before, after=after)
    r = cttiming.ratio(sec, peak, WORK_SEC, WORK_PEAK, efficiency=True)
    assert r["status"] == "ok" and r["disturbed_pairs"] == 1  # the pair the step fell in
    assert r["value"] == pytest.approx(TRUE_MFU, rel=0.10)
    assert r["min"] <= r["value"] <= r["max"]
    # The old way: peak timed once at the start, the section later (median of its timings).
    start_only = cttiming.rate(sec, WORK_SEC)["median"] / (WORK_PEAK / peak[0].seconds)
    assert abs(start_only / TRUE_MFU - 1) > 0.10
    if before > after:  # peak timed under load, section idle: an "efficiency" above 1
        assert start_only > 1


def test_undetected_step_is_one_outlier_the_median_ignores():
    peak, sec = series(known=False)  # no /proc/stat: the step pair cannot be told
    r = cttiming.ratio(sec, peak, WORK_SEC, WORK_PEAK, efficiency=True)
    assert r["disturbed_pairs"] == 0 and r["value"] == pytest.approx(TRUE_MFU, rel=0.10)
    assert r["min"] < 0.7 * TRUE_MFU  # the step pair shows in the spread


def test_load_changing_within_most_pairs_is_marked_disturbed():
    rng = np.random.default_rng(1)
    peak = [Sample(0.5 * (1 + 0.02 * rng.standard_normal()), 0.0) for _ in range(6)]
    sec = [Sample(0.3 * (1 + 0.02 * rng.standard_normal()), 1.0 if i < 4 else 0.0)
           for i in range(6)]
    r = cttiming.ratio(sec, peak, WORK_SEC, WORK_PEAK)
    assert r["status"] == "disturbed" and r["disturbed_pairs"] == 4
    assert "DISTURBED" in cttiming.describe("train_mfu", r)


def test_efficiency_above_one_is_invalid_never_a_value():
    peak = [Sample(1.0, 0.0)] * 3
    sec = [Sample(0.4, 0.0)] * 3  # 50 GFLOP in 0.4 s vs 100 in 1 s: 1.25
    r = cttiming.ratio(sec, peak, WORK_SEC, WORK_PEAK, efficiency=True)
    assert r["status"] == "invalid" and r["value"] is None and "1.25 > 1" in r["reason"]
    line = cttiming.describe("train_mfu", r)
    assert "INVALID" in line and "1.25 [" not in line
    ok = cttiming.ratio(sec, peak, WORK_SEC, WORK_PEAK, load_dependent=True)  # a speed-up
    assert ok["status"] == "ok" and ok["value"] == pytest.approx(1.25)  # may exceed 1
    assert "depends on the load" in cttiming.describe("train_bf16_speedup", ok)
    plain = cttiming.ratio(sec, peak, WORK_SEC, WORK_PEAK)  # the line says what the ratio is
    assert "depends on the load" not in cttiming.describe("train_bf16_speedup", plain)
    with pytest.raises(ValueError, match="need pairs"):
        cttiming.ratio(sec, peak[:2])


def test_cpu_meter_counts_other_processes(tmp_path, monkeypatch):
    """others = (machine busy seconds - this process's CPU seconds) / wall, from /proc/stat."""
    stat = tmp_path / "stat"
    meter = cttiming.CpuMeter(str(stat))
    meter.hz = 100
    stat.write_text("cpu  1000 0 500 9000 0 0 0 0 0 0\ncpu0 ...\n")
    monkeypatch.setattr(cttiming.CpuMeter, "own_s", staticmethod(lambda: 7.0))

    def other_job_runs():  # 30 busy jiffies = 0.3 s of another process's CPU time
        stat.write_text("cpu  1020 0 510 9100 0 0 0 0 0 0\n")

    s = meter.time(other_job_runs)
    assert s.others == pytest.approx(0.3 / s.seconds)
    stat.write_text("garbage\n")
    assert meter.time(lambda: None).others is None


def test_interleave_alternates_and_repeats_short_calls():
    order = []
    fns = {"a": lambda: order.append("a"), "b": lambda: order.append("b")}
    out = cttiming.interleave(fns, 3, min_s=0)
    assert order == ["a", "b"] + ["a", "b"] * 3  # one calibration call each, then A, B, A, B
    assert [len(v) for v in out.values()] == [3, 3]
    order.clear()
    cttiming.interleave({"a": fns["a"]}, 2, min_s=1e-3)  # sub-microsecond calls: repeated
    assert len(order) > 3


def test_a_load_dependent_ratio_under_a_steady_load_is_marked_disturbed():
    """A steady busy loop changes no pair, yet moves a ratio whose sides share the cores
    differently (the cold loader ratio: 1.31 idle vs 1.97 beside a busy loop): such a ratio
    is flagged whenever others kept cores busy; an idle one is not."""
    rng = np.random.default_rng(2)

    def samples(seconds, others):
        return [Sample(seconds * (1 + 0.02 * rng.standard_normal()), others) for _ in range(5)]

    busy = cttiming.ratio(samples(0.2, 1.0), samples(0.4, 1.0), load_dependent=True)
    assert busy["status"] == "disturbed" and busy["disturbed_pairs"] == 0
    assert "depends on the load itself" in cttiming.describe("loader_ratio", busy)
    idle = cttiming.ratio(samples(0.2, 0.05), samples(0.4, 0.05), load_dependent=True)
    assert idle["status"] == "ok" and idle["value"] == pytest.approx(2.0, rel=0.1)
    # The same busy timings as a ratio not declared load-dependent stay a result.
    assert cttiming.ratio(samples(0.2, 1.0), samples(0.4, 1.0))["status"] == "ok"
    assert "depends on the load" in cttiming.describe("train patch64_b16 mfu", busy)

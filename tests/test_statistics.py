"""Paired tests with the patient as the unit (issue 23): the false-positive rate is controlled
when slices of one patient are correlated, and few patients give no p-value (numpy / scipy only).
"""

from __future__ import annotations

import numpy as np
from scipy.stats import wilcoxon

import ctmetrics


def clustered_null(rng, patients: int, slices: int, between: float, within: float = 1.0):
    """Per-slice paired differences with no true effect: a patient offset (sd ``between``)
    shared by that patient's slices plus independent slice noise (sd ``within``)."""
    offset = np.repeat(rng.normal(0.0, between, patients), slices)
    diff = offset + rng.normal(0.0, within, patients * slices)
    return diff, np.repeat([f"P{i}" for i in range(patients)], slices)


def test_false_positive_rate_is_controlled_with_patients_as_unit():
    """8 patients x 20 slices, between-patient spread 2x the within-patient one, no effect:
    the per-patient test rejects at p < 0.05 in about 5 % of data sets (exact test: <= 0.05),
    where pooling the slices (the old test) rejects in most of them."""
    rng = np.random.default_rng(0)
    runs, ours, pooled = 400, 0, 0
    for _ in range(runs):
        diff, pats = clustered_null(rng, 8, 20, between=2.0)
        ours += ctmetrics.paired_p(diff, pats) < 0.05
        pooled += wilcoxon(diff).pvalue < 0.05
    assert ours / runs <= 0.075  # nominal 0.05 (exact n = 8: 0.039), binomial sd ~0.011
    assert pooled / runs > 0.5


def test_few_patients_give_no_p_value_and_say_so():
    rng = np.random.default_rng(1)
    diff, pats = clustered_null(rng, 5, 10, between=0.5)
    assert ctmetrics.paired_p(diff + 3.0, pats) is None  # even a large effect: 5 < 6 patients
    assert ctmetrics.paired_p(*clustered_null(rng, 6, 10, between=0.5)) is not None
    note = ctmetrics.interval_note(50, 5)
    assert "descriptive" in note and "no p-value" in note
    assert "descriptive" not in ctmetrics.interval_note(60, 6)


def test_two_units_interval_is_min_max_and_says_so():
    """With two patients the percentile bootstrap '95 %' interval is [min, max] of their means."""
    values = np.array([1.0, 1.2, 1.1, 5.0, 5.3])
    pats = np.array(["A", "A", "A", "B", "B"])
    lo, hi = ctmetrics.bootstrap_ci(values, pats)
    means = ctmetrics.patient_means(values, pats)
    assert (lo, hi) == (min(means), max(means))
    assert "[min, max]" in ctmetrics.interval_note(5, 2)
    assert "[min, max]" in ctmetrics.interval_note(2, 1)  # one patient, two slices

"""Laguerre-Gauss CHO (ctcho, issue 24) on cases with a known answer.

White noise of std sigma and a Gaussian signal of the channel's own width: the signal lies in the
span of the LG channels, so the CHO is the ideal (prewhitening = non-prewhitening) observer and
d' = ||s - mean(s)|| / sigma (the ROI mean is removed, an orthogonal projection that keeps white
noise white), AUC = Phi(d' / sqrt 2). Signal absent on both sides: d' ~ 0, AUC ~ 0.5.
"""

import math

import numpy as np
import pytest
from scipy.special import eval_laguerre
from scipy.stats import mannwhitneyu, norm

import ctcho

SIZE = 21


def gaussian_signal(amplitude: float, width: float) -> np.ndarray:
    c = (np.arange(SIZE) - (SIZE - 1) / 2) ** 2
    return amplitude * np.exp(-math.pi * (c[:, None] + c[None, :]) / width ** 2)


def rois(rng, r: int, k: int, signal: np.ndarray, sigma: float) -> np.ndarray:
    return signal + rng.normal(0.0, sigma, (r, k, SIZE, SIZE))


def test_channels_match_scipy_laguerre_and_are_orthonormal_in_the_continuum():
    width = 6.0
    ch = ctcho.lg_channels(SIZE, width, 4)
    c = (np.arange(SIZE) - (SIZE - 1) / 2) ** 2
    r2 = c[:, None] + c[None, :]
    for j in range(4):
        ref = math.sqrt(2) / width * eval_laguerre(j, 2 * math.pi * r2 / width ** 2) \
            * np.exp(-math.pi * r2 / width ** 2)
        np.testing.assert_allclose(ch[j], ref, rtol=1e-10, atol=1e-14)
    gram = np.tensordot(ch, ch, axes=([1, 2], [1, 2]))
    np.testing.assert_allclose(gram, np.eye(4), atol=0.02)  # sampled at 1 px, width 6 px


def test_auc_matches_mann_whitney_with_ties():
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 5, 60).astype(float), rng.integers(0, 4, 80).astype(float)
    assert ctcho.auc_mann_whitney(a, b) == pytest.approx(
        mannwhitneyu(a, b).statistic / (a.size * b.size))


def test_cho_reaches_the_ideal_dprime_of_a_known_template_in_white_noise():
    rng = np.random.default_rng(1)
    sigma, width = 10.0, 6.0
    s = gaussian_signal(8.0, width)
    ideal = float(np.linalg.norm(s - s.mean()) / sigma)
    assert 1.5 < ideal < 3.5
    res = ctcho.cho_study(rois(rng, 600, 1, s, sigma), rois(rng, 600, 2, 0.0, sigma),
                          diameter_px=width / ctcho.WIDTH_PER_DIAMETER, n_boot=100, seed=2)
    assert res["channel_width_px"] == pytest.approx(width)
    lo, hi = res["dprime_ci"]
    assert lo < ideal < hi and hi - lo < 0.5
    assert res["dprime"] == pytest.approx(ideal, rel=0.06)
    assert res["auc"] == pytest.approx(norm.cdf(ideal / math.sqrt(2)), abs=0.02)


def test_signal_absent_gives_dprime_zero_and_auc_one_half():
    rng = np.random.default_rng(3)
    res = ctcho.cho_study(rois(rng, 200, 1, 0.0, 5.0), rois(rng, 200, 2, 0.0, 5.0),
                          diameter_px=9.0, n_boot=100)
    assert res["dprime_ci"][0] < 0 < res["dprime_ci"][1]
    assert abs(res["dprime"]) < 0.25
    assert res["auc_ci"][0] < 0.5 < res["auc_ci"][1]


def test_interval_narrows_with_more_realisations_and_inputs_are_checked():
    rng = np.random.default_rng(4)
    s = gaussian_signal(5.0, 6.0)
    widths = []
    for r in (40, 320):
        res = ctcho.cho_study(rois(rng, r, 1, s, 10.0), rois(rng, r, 2, 0.0, 10.0), 9.0,
                              n_boot=100)
        widths.append(res["dprime_ci"][1] - res["dprime_ci"][0])
    assert widths[1] < 0.5 * widths[0]  # ~ 1 / sqrt(8) = 0.35 expected
    with pytest.raises(ValueError):
        ctcho.cho_study(np.zeros((3, 1, 5, 5)), np.zeros((3, 1, 5, 5)), 3.0)
    with pytest.raises(ValueError):
        ctcho.cho_study(np.zeros((5, 1, 5, 5)), np.zeros((4, 1, 5, 5)), 3.0)

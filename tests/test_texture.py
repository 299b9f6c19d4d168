"""TG-233 noise texture against analytic spectra (issue 23): the mean frequency f_av, the noise std
and their biases per ROI size (the figures the README states), and white noise through
Mytest.py + Myevaluation.py.

Analytic references: white noise has a flat NPS, f_av = integral_0^0.5 f df / 0.5 = 0.25
cycles/px; noise filtered by a Gaussian of sigma s px has NPS(f) ~ exp(-4 pi^2 s^2 f^2), so
f_av = integral_0^0.5 f e^{-a f^2} df / integral_0^0.5 e^{-a f^2} df with a = 4 pi^2 s^2, and
std = std_white * sum(k^2) over the 1-D kernel k of the filter (separable).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy.integrate import quad
from scipy.ndimage import gaussian_filter, gaussian_filter1d

import cttexture


def analytic_fav(sigma: float) -> float:
    if sigma == 0:
        return 0.25
    a = 4 * math.pi ** 2 * sigma ** 2
    return (quad(lambda f: f * math.exp(-a * f * f), 0, 0.5)[0]
            / quad(lambda f: math.exp(-a * f * f), 0, 0.5)[0])


def analytic_std(sigma: float, white: float) -> float:
    if sigma == 0:
        return white
    k = gaussian_filter1d(np.eye(1, 41, 20).ravel(), sigma, mode="constant")
    return white * float((k ** 2).sum())


def measured(field: np.ndarray, size: int) -> dict:
    n = field.shape[0] // size
    rois = np.stack([field[i * size:(i + 1) * size, j * size:(j + 1) * size]
                     for i in range(n) for j in range(n)])
    return cttexture.nps_summary(cttexture.nps_2d(cttexture.nps_power(rois), len(rois), None),
                                 None)


# (Gaussian sigma px, ROI px): measured / analytic ranges of (noise std, f_av); the README
# "Noise texture" table states the centres (1024x1024 fields, periodic filtering).
BIASES = {
    (0.0, 32): ((0.99, 1.01), (1.06, 1.09)), (0.0, 64): ((0.99, 1.01), (1.025, 1.05)),
    (0.0, 128): ((0.99, 1.01), (1.005, 1.03)),
    (1.0, 32): ((0.975, 0.995), (1.17, 1.23)), (1.0, 64): ((0.99, 1.005), (1.07, 1.13)),
    (1.0, 128): ((0.99, 1.01), (1.03, 1.08)),
    (3.0, 32): ((0.86, 0.90), (1.60, 1.76)), (3.0, 64): ((0.95, 0.98), (1.24, 1.36)),
    (3.0, 128): ((0.975, 1.005), (1.10, 1.20)),
}


@pytest.mark.parametrize("sigma", [0.0, 1.0, 3.0])
def test_fav_and_std_biases_against_analytic_spectra(sigma):
    white = np.random.default_rng(int(sigma) + 7).normal(0.0, 10.0, (1024, 1024))
    field = gaussian_filter(white, sigma, mode="wrap") if sigma else white
    for size in (32, 64, 128):
        got = measured(field, size)
        std_ratio = got["noise_std"] / analytic_std(sigma, 10.0)
        fav_ratio = got["nps_mean_freq"] / analytic_fav(sigma)
        (s_lo, s_hi), (f_lo, f_hi) = BIASES[sigma, size]
        assert s_lo <= std_ratio <= s_hi, (sigma, size, std_ratio)
        assert f_lo <= fav_ratio <= f_hi, (sigma, size, fav_ratio)


def test_fav_is_tg233_not_the_2d_weighted_mean():
    """The TG-233 f_av of white noise is ~0.25 cycles/px, not the ~0.38 of |f| weighted over
    the whole 2-D square (corners beyond Nyquist included)."""
    field = np.random.default_rng(1).normal(0.0, 5.0, (512, 512))
    got = measured(field, 128)["nps_mean_freq"]
    assert 0.25 <= got <= 0.26


def test_white_noise_disc_through_mytest_and_myevaluation(tiny_run, tmp_path):
    """Acceptance: white noise on a flat disc, npy pairs, through Mytest.py (the tiny identity
    run) and Myevaluation.py: NPS mean frequency of the input between 0.24 and 0.29 cycles/pixel
    (32-px ROIs, rings 1/32 wide: 0.2656 expected, see test_fav_and_std_biases...)."""
    import Myevaluation
    import Mytest

    data = tmp_path / "disc"
    data.mkdir()
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:192, :192]
    fd = np.where(np.hypot(yy - 96, xx - 96) < 90, 40.0, -1000.0)
    for i in range(2):
        ld = fd + rng.normal(0.0, 20.0, fd.shape)
        np.save(data / f"D1_{i}_input.npy", (ld + 1024) / 4096)
        np.save(data / f"D1_{i}_target.npy", (fd + 1024) / 4096)
    out = tmp_path / "out"
    assert Mytest.main(["--data", str(data), "--run", str(tiny_run), "--out", str(out),
                        "--no-figures"]) == 0
    assert Myevaluation.main(["--pred", str(out)]) == 0
    report = json.loads((out / "metrics.json").read_text())
    assert report["noise"]["unit"] == "cycles/pixel"
    ldct = report["overall"]["ldct"]["noise"]
    assert 0.24 <= ldct["nps_mean_freq"]["mean"] <= 0.29
    assert ldct["noise_std"]["mean"] == pytest.approx(20.0, rel=0.05)
    assert "f_av" in report["noise_protocol"]

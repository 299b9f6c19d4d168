"""Laguerre-Gauss channelized Hotelling observer (LG CHO): d' and AUC of a signal-known-exactly,
location-known-exactly detection task, with confidence intervals from realisations.

Definition (as in the FDA's LCD-CT toolbox, DIDSR/LCD_CT ``bin/observer functions/lg_cho_2d.m``,
``bin/laguerre_gaussian_2d.m`` and ``measure_LCD.m``; Barrett & Myers, *Foundations of Image
Science*, ch. 13-14):

* **Channels.** ``u_j(r) = sqrt(2) / h * L_j(2 pi r^2 / h^2) * exp(-pi r^2 / h^2)``, j = 0..J-1,
  ``L_j`` the Laguerre polynomials, r the distance from the ROI centre ((n - 1) / 2) in pixels.
  The toolbox's defaults: **J = 5 channels, width h = 2/3 of the insert's size in pixels**
  (``measure_LCD.m`` sets ``channel_width = 2/3 * insert_r`` where ``get_insert_radius`` returns the
  bounding-box width of the insert mask, i.e. its diameter); :data:`N_CHANNELS`,
  :func:`channel_width_px`. The ROI mean (DC) is removed from every ROI first, as there.
* **Template.** Channel outputs ``v = U^T g``; ``w = K^-1 (mean v_SP - mean v_SA)`` with K the
  mean of the signal-present and signal-absent channel covariances of the **training** set
  (pseudo-inverse, as ``pinv`` there).
* **Figures of merit** on the **test** set (other realisations): ``t = w^T v``,
  ``d' = (mean t_SP - mean t_SA) / sqrt((var t_SP + var t_SA) / 2)`` and the AUC as the
  Mann-Whitney statistic of the test scores (the toolbox's ``roc.m`` gives the same empirical AUC).
* **Intervals.** The toolbox repeats random 50/50 train/test splits (``n_reader``) and reports
  their spread; the spread of split-to-split figures is not a confidence interval (every split
  uses the same images). Here the realisations themselves are resampled: each of ``n_boot``
  bootstrap replicates draws the realisations with replacement, splits them 50/50 into train
  and test (whole realisations: every ROI of one realisation lands on the same side) and
  computes d' and AUC; the interval is the percentile interval of the replicates, the point
  estimate the median. The channel outputs are computed once, so a replicate costs a 5 x 5
  solve.

numpy only (no TensorFlow, no scipy).
"""

from __future__ import annotations

import math

import numpy as np

N_CHANNELS = 5  # LCD-CT toolbox default (LG_CHO_2D.n_channels)
WIDTH_PER_DIAMETER = 2.0 / 3.0  # LCD-CT measure_LCD.m: channel_width = 2/3 * insert size (px)
N_BOOT = 200
CI_LEVEL = 0.95


def channel_width_px(diameter_px: float) -> float:
    """The toolbox's LG channel width for an insert of ``diameter_px`` pixels."""
    return WIDTH_PER_DIAMETER * float(diameter_px)


def laguerre(x: np.ndarray, n: int) -> np.ndarray:
    """Laguerre polynomials L_0..L_{n-1} at ``x``: array [n, *x.shape] (three-term recurrence)."""
    x = np.asarray(x, np.float64)
    out = np.empty((n, *x.shape))
    out[0] = 1.0
    if n > 1:
        out[1] = 1.0 - x
    for j in range(1, n - 1):
        out[j + 1] = ((2 * j + 1 - x) * out[j] - j * out[j - 1]) / (j + 1)
    return out


def lg_channels(size: int, width_px: float, n_channels: int = N_CHANNELS) -> np.ndarray:
    """LG channel images [n_channels, size, size] centred at ((size - 1) / 2, (size - 1) / 2)."""
    if not (width_px > 0 and n_channels >= 1 and size >= 2):
        raise ValueError("lg_channels needs width_px > 0, n_channels >= 1 and size >= 2")
    c = (np.arange(size) - (size - 1) / 2.0) ** 2
    r2 = c[:, None] + c[None, :]
    q = math.pi * r2 / width_px ** 2
    return math.sqrt(2.0) / width_px * laguerre(2.0 * q, n_channels) * np.exp(-q)


def channelize(rois: np.ndarray, channels: np.ndarray) -> np.ndarray:
    """Channel outputs of ROIs [..., size, size] (DC removed from each ROI): [..., n_channels]."""
    rois = np.asarray(rois, np.float64)
    rois = rois - rois.mean(axis=(-2, -1), keepdims=True)
    return np.tensordot(rois, channels, axes=([-2, -1], [1, 2]))


def auc_mann_whitney(t_sp: np.ndarray, t_sa: np.ndarray) -> float:
    """Empirical AUC: P(t_SP > t_SA) + P(t_SP = t_SA) / 2 over all pairs."""
    t_sp, t_sa = np.ravel(t_sp), np.ravel(t_sa)
    order = np.argsort(np.concatenate([t_sp, t_sa]), kind="mergesort")
    ranks = np.empty(order.size)
    values = np.concatenate([t_sp, t_sa])[order]
    # average ranks for ties
    i = 0
    while i < values.size:
        j = i
        while j + 1 < values.size and values[j + 1] == values[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    n1, n0 = t_sp.size, t_sa.size
    return float((ranks[:n1].sum() - n1 * (n1 + 1) / 2.0) / (n1 * n0))


def hotelling(train_sp: np.ndarray, train_sa: np.ndarray, test_sp: np.ndarray,
              test_sa: np.ndarray) -> tuple[float, float]:
    """(d', AUC) of the Hotelling template trained on channel vectors ``train_*`` [N, J] and
    scored on ``test_*`` (module docstring)."""
    k = 0.5 * (np.cov(train_sp, rowvar=False) + np.cov(train_sa, rowvar=False))
    w = np.linalg.pinv(np.atleast_2d(k)) @ (train_sp.mean(0) - train_sa.mean(0))
    t_sp, t_sa = test_sp @ w, test_sa @ w
    pooled = math.sqrt(0.5 * (t_sp.var(ddof=1) + t_sa.var(ddof=1)))
    dprime = float((t_sp.mean() - t_sa.mean()) / pooled) if pooled > 0 else 0.0
    return dprime, auc_mann_whitney(t_sp, t_sa)


def _draw_split(rng: np.random.Generator, r: int) -> tuple[np.ndarray, np.ndarray]:
    """One bootstrap replicate: R realisations drawn with replacement, their distinct indices
    split at random 50/50 into train and test; redrawn until each side holds >= 2 draws (a
    covariance and a variance need two). Depends only on the generator's state and R."""
    while True:
        draw = rng.integers(0, r, r)
        uniq = rng.permutation(np.unique(draw))
        train = np.isin(draw, uniq[: len(uniq) // 2])
        if train.sum() >= 2 and (~train).sum() >= 2:
            return draw[train], draw[~train]


def cho_study(sp_rois: np.ndarray, sa_rois: np.ndarray, diameter_px: float, *,
              n_channels: int = N_CHANNELS, n_boot: int = N_BOOT, level: float = CI_LEVEL,
              seed: int = 0, replicates: bool = False) -> dict:
    """LG CHO d' and AUC with percentile intervals from a bootstrap over realisations.

    ``sp_rois`` [R, a, n, n] and ``sa_rois`` [R, b, n, n]: the signal-present and signal-absent
    ROIs of each of R realisations (a, b >= 1 ROIs each). Each replicate resamples the R
    realisations with replacement and splits the drawn realisations 50/50 into train and test
    (a realisation drawn twice stays on one side). Returns ``{"dprime", "dprime_ci", "auc",
    "auc_ci", "n_channels", "channel_width_px", "realisations", "n_boot"}``, and with
    ``replicates`` the replicates' d' (``"dprime_boot"``, an array). The draws depend only on
    ``seed``, R and ``n_boot``: studies of other inserts or methods on the same realisations with
    the same seed use the same draws (paired), so their replicates can be averaged or compared.
    """
    sp, sa = np.asarray(sp_rois), np.asarray(sa_rois)
    if sp.ndim != 4 or sa.ndim != 4 or sp.shape[0] != sa.shape[0] or sp.shape[2:] != sa.shape[2:]:
        raise ValueError("cho_study expects [R, k, n, n] ROIs with the same R and n")
    r = sp.shape[0]
    if r < 4:
        raise ValueError(f"cho_study needs at least 4 realisations, got {r}")
    width = channel_width_px(diameter_px)
    ch = lg_channels(sp.shape[-1], width, n_channels)
    v_sp, v_sa = channelize(sp, ch), channelize(sa, ch)  # [R, k, J]
    rng = np.random.default_rng(seed)
    d, a = np.empty(n_boot), np.empty(n_boot)
    for i in range(n_boot):
        tr, te = _draw_split(rng, r)
        d[i], a[i] = hotelling(v_sp[tr].reshape(-1, n_channels), v_sa[tr].reshape(-1, n_channels),
                               v_sp[te].reshape(-1, n_channels), v_sa[te].reshape(-1, n_channels))
    q = [(1 - level) / 2 * 100, (1 + level) / 2 * 100]
    extra = {"dprime_boot": d} if replicates else {}
    return {**extra, "dprime": float(np.median(d)),
            "dprime_ci": [float(x) for x in np.percentile(d, q)],
            "auc": float(np.median(a)), "auc_ci": [float(x) for x in np.percentile(a, q)],
            "n_channels": n_channels, "channel_width_px": width, "realisations": r,
            "n_boot": n_boot}

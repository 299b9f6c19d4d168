"""Which epoch a training run keeps as ``generator_best`` (Mytrain ``--select``), numpy only.

Criteria:

* ``psnr``: the epoch of the best validation PSNR -- the original project's choice. It suits the
  L1 end of the trade-off; for a GAN it picks the smoothest epoch.
* ``last``: the last epoch -- what ``make train-mayo`` and ``make cv-mayo`` score.
* ``texture``: the epoch of the best validation PSNR among those whose denoised noise keeps the
  input noise's texture: on the validation patient's full-dose slices, two simulated quarter-dose
  realisations each (``ctdose.simulate_pair_from_fd``, the same every epoch), both denoised; the
  noise-only NPS of the pair (``Myevaluation.py --nps-sim``'s definition, AAPM TG-233 figures of
  :mod:`cttexture`) has its peak frequency and mean frequency f_av within ``TEXTURE_TOL`` of the
  input noise's and its std below ``1 - TEXTURE_TOL`` of the input's (an identity keeps the
  texture trivially). Full-dose noise has the input noise's spectral shape at a lower level, so
  this is "within 15 % of full-dose texture" measured where no flat ROI is needed (validation
  slices often have none). When no epoch qualifies, the epoch closest in texture among those that
  remove noise; when none removes noise, the best PSNR.
* ``auto``: ``last`` for a run with an adversarial term, ``psnr`` for an L1-only run. Decided by
  the 7 cross-validation folds (README "Cross-validation"): on the adversarial recipe ``texture``
  chose epochs 2-8 of 10, still noisy (flat-ROI noise 1.32x full dose against 1.18x for the last
  epoch, soft-tissue bias sd 1.48 against 0.78 HU) at -0.61 dB, because the denoised noise's
  spectrum coarsens as training goes on.

The chosen epoch and why are recorded in state.json and config.json (``select``); with
``texture`` history.csv has every epoch's ``val_nps_peak_ratio``, ``val_nps_fav_ratio`` and
``val_noise_ratio``.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import numpy as np

import cttexture

CRITERIA = ("auto", "last", "psnr", "texture")
TEXTURE_TOL = 0.15  # relative, on the NPS peak and f_av (issue 25's "within 15 %")
TEXTURE_DOSE = 0.25  # simulated dose fraction of the noise-only probe
TEXTURE_SLICES = 4  # at most this many validation slices are probed
TEXTURE_FIELDS = ("val_nps_peak_ratio", "val_nps_fav_ratio", "val_noise_ratio")


def resolve(criterion: str, adv_weight: float) -> str:
    """``auto`` -> ``last`` when ``adv_weight > 0`` else ``psnr``; others unchanged."""
    if criterion not in CRITERIA:
        raise ValueError(f"unknown checkpoint criterion {criterion!r} (choose from "
                         f"{', '.join(CRITERIA)})")
    if criterion == "auto":
        return "last" if adv_weight > 0 else "psnr"
    return criterion


class NoiseOnlyProbe:
    """Fixed simulated low-dose pairs of some full-dose slices, and the texture of a denoiser's
    noise on them relative to the input noise's.

    Args:
        slices: ``(fd_hu, pixel_mm, spacing_mm)`` per full-dose slice, all of one size;
            ``pixel_mm`` drives the simulator, ``spacing_mm`` (None: unknown) the NPS units.
        dose: simulated dose fraction.
        seed: noise seed; slice i, realisation k uses ``(seed, i, k)``.
    """

    def __init__(self, slices: Sequence[tuple[np.ndarray, float, Optional[float]]],
                 dose: float = TEXTURE_DOSE, seed: int = 0):
        import ctdose

        self.pairs, self.rois, size = [], [], None
        for i, (fd, pixel_mm, spacing) in enumerate(slices):
            size = size or cttexture.noise_roi_size(fd)  # one ROI size: the spectra add up
            corners = cttexture.noise_rois(fd, size)
            if corners:
                lds = [ctdose.simulate_pair_from_fd(fd, dose, pixel_mm, (seed, i, k))
                       for k in (1, 2)]
                self.pairs.append(lds)
                self.rois.append((corners, size, spacing))
        self.input = self._figures([tuple(p) for p in self.pairs]) if self.pairs else None

    def _figures(self, pairs: list[tuple[np.ndarray, np.ndarray]]) -> dict:
        acc = cttexture.NoiseAccumulator(("x",))
        for (a, b), (corners, size, spacing) in zip(pairs, self.rois):
            acc.add("all", "x", cttexture.noise_only_power(a, b, corners, size), len(corners),
                    spacing)
        return acc.curves("all")["x"]

    def measure(self, denoise: Callable[[list[np.ndarray]], list[np.ndarray]]) -> dict:
        """``denoise``: HU slices -> denoised HU slices. Returns TEXTURE_FIELDS, each the
        denoised noise's figure over the input noise's ({} when no ROI fits any slice)."""
        if self.input is None:
            return {}
        out = self._figures([tuple(denoise(list(p))) for p in self.pairs])
        ratio = lambda key: out[key] / self.input[key]  # noqa: E731
        return {"val_nps_peak_ratio": ratio("nps_peak"),
                "val_nps_fav_ratio": ratio("nps_mean_freq"),
                "val_noise_ratio": ratio("noise_std")}


def texture_deviation(figures: dict) -> float:
    """max(|peak ratio - 1|, |f_av ratio - 1|)."""
    return max(abs(figures["val_nps_peak_ratio"] - 1.0), abs(figures["val_nps_fav_ratio"] - 1.0))


def rank(criterion: str, logs: dict, epoch: int, tol: float = TEXTURE_TOL) -> Optional[list]:
    """The sort key of ``epoch`` (larger is better; None: no validation score).

    ``last``: ``[1, 1, epoch]``. ``psnr``: ``[1, 1, val_psnr]``. ``texture``: ``[removes noise,
    within tol, val_psnr if within tol else -deviation]`` (``[0, 0, val_psnr]`` when it removes
    no noise): every qualifying epoch beats every other, the closest texture wins among the
    rest; without texture figures (no ROI in the body) the PSNR alone."""
    psnr = logs.get("val_psnr")
    if psnr is None or not math.isfinite(psnr):
        return None
    if criterion == "last":
        return [1, 1, float(epoch)]
    if criterion == "psnr" or "val_nps_peak_ratio" not in logs:
        return [1, 1, float(psnr)]
    if logs["val_noise_ratio"] >= 1.0 - tol:  # removes (next to) no noise
        return [0, 0, float(psnr)]
    dev = texture_deviation(logs)
    return [1, 1, float(psnr)] if dev <= tol else [1, 0, -dev]


def reason(criterion: str, logs: dict, key: Optional[list], tol: float = TEXTURE_TOL) -> str:
    """Why the epoch of ``logs`` with ``key`` (from :func:`rank`) was chosen, in words."""
    if criterion == "last":
        return "the last epoch (--select last)"
    if criterion == "psnr" or key is None:
        return "best validation PSNR"
    if "val_nps_peak_ratio" not in logs:
        return "no ROI for the texture probe in the validation slices: best validation PSNR"
    if key[1]:
        return (f"best validation PSNR among epochs whose noise-only NPS peak and f_av are "
                f"within {tol:.0%} of the input noise's")
    if key[0]:
        return (f"no epoch within {tol:.0%} of the input noise's texture: the closest "
                f"(deviation {-key[2]:.2f})")
    return "no epoch removed noise on the texture probe: best validation PSNR"


def update_best(state: dict, criterion: str, logs: dict, epoch: int) -> bool:
    """Whether ``epoch`` becomes generator_best; if so ``state`` (state.json) records it:
    ``best_epoch``, ``best_key``, ``best_criterion``, ``best_reason``, ``best_val_psnr``.

    A best of another criterion (a run resumed after its criterion changed; runs made before
    ``--select`` chose by PSNR and recorded only ``best_val_psnr``) does not count. Without a
    validation score at all (no validation) every epoch becomes the best: the last."""
    key = rank(criterion, logs, epoch)
    if key is None:
        if "val_psnr" in logs:  # a non-finite validation score: never the best
            return False
        state.update(best_epoch=epoch, best_reason="no validation: the last epoch")
        return True
    best = None
    if state.get("best_criterion", "psnr") == criterion and "best_epoch" in state:
        best = state.get("best_key") or [1, 1, state.get("best_val_psnr", -math.inf)]
    if best is not None and key <= best:
        return False
    state.update(best_epoch=epoch, best_key=key, best_criterion=criterion,
                 best_val_psnr=float(logs["val_psnr"]),
                 best_reason=reason(criterion, logs, key))
    return True

"""The named metric protocols equal the peers' own metric code (issue 23).

Each reference below is written here, in numpy / scipy, from the peer's code read on GitHub
(independently of ctmetrics):

* RED-CNN, SSinyu/RED-CNN ``measure.py`` + ``solver.py``: HU truncated to [-160, 240] (not
  shifted), data_range 400; SSIM: 11x11 Gaussian (sigma 1.5) by ``F.conv2d(padding=5)`` (zero
  padding, same size), mean of the whole map; PSNR ``10 log10(400^2 / MSE)``; RMSE in HU.
* DU-GAN, Hzzone/DU-GAN ``utils/dataset.py`` (clamp [-300, 300] -> [0, 1]),
  ``utils/metrics.py``: SSIM by kornia ``filter2D`` (border "reflect" = torch's reflect, the
  edge pixel not repeated = scipy's "mirror"), the map clamped to [0, 1], then the mean; PSNR
  with max 1; RMSE on the [0, 1] image.
* CoreDiff, qgao21/CoreDiff ``models/basic_template.py`` (``transfer_calculate_window``: clip
  [-1000, 1000], ``255 * (img + 1000) / 2000``, no rounding), ``models/corediff/corediff.py``
  (``data_range = full_dose.max() - full_dose.min()``), ``utils/measure.py`` (RED-CNN's SSIM;
  RMSE after ``img * 2000 / 255 - 1000``, i.e. in HU).
* skimage / full: scikit-image ``structural_similarity(gaussian_weights=True, sigma=1.5,
  use_sample_covariance=False)`` and ``peak_signal_noise_ratio``.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from scipy.ndimage import correlate1d, gaussian_filter

import ctio
import ctmetrics

PSNR_TOL, SSIM_TOL = 0.01, 5e-4


def _gaussian11() -> np.ndarray:
    """pytorch-ssim's ``gaussian(11, 1.5)``; the 2-D window is its outer product."""
    g = np.exp(-((np.arange(11) - 5) ** 2) / (2 * 1.5 ** 2))
    return g / g.sum()


def _ssim_same(x, y, data_range, mode: str, clamp: bool = False) -> float:
    """pytorch-ssim as in RED-CNN / CoreDiff (mode "constant") or kornia as in DU-GAN
    ("mirror"): same-size maps, mean of the whole map."""
    g = _gaussian11()

    def f(a):  # the 2-D correlation with the outer-product window, as two 1-D passes
        return correlate1d(correlate1d(a, g, 0, mode=mode, cval=0.0), g, 1, mode=mode, cval=0.0)

    mu1, mu2 = f(x), f(y)
    s11, s22, s12 = f(x * x) - mu1 ** 2, f(y * y) - mu2 ** 2, f(x * y) - mu1 * mu2
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    m = ((2 * mu1 * mu2 + c1) * (2 * s12 + c2)) / ((mu1 ** 2 + mu2 ** 2 + c1) * (s11 + s22 + c2))
    return float(np.clip(m, 0, 1).mean() if clamp else m.mean())


def redcnn_ref(pred_hu, ref_hu) -> dict:
    x, y = np.clip(pred_hu, -160, 240), np.clip(ref_hu, -160, 240)
    mse = np.mean((x - y) ** 2)
    return {"psnr": 10 * np.log10(400.0 ** 2 / mse), "ssim": _ssim_same(x, y, 400.0, "constant"),
            "rmse": np.sqrt(mse)}


def dugan_ref(pred_hu, ref_hu) -> dict:
    x, y = ((np.clip(v, -300, 300) + 300) / 600 for v in (pred_hu, ref_hu))
    mse = np.mean((x - y) ** 2)
    return {"psnr": 10 * np.log10(1.0 / mse), "ssim": _ssim_same(x, y, 1.0, "mirror", True),
            "rmse": np.sqrt(mse)}


def corediff_ref(pred_hu, ref_hu) -> dict:
    x, y = (255 * (np.clip(v, -1000, 1000) + 1000) / 2000 for v in (pred_hu, ref_hu))
    data_range = y.max() - y.min()
    hx, hy = x * 2000 / 255 - 1000, y * 2000 / 255 - 1000
    return {"psnr": 10 * np.log10(data_range ** 2 / np.mean((x - y) ** 2)),
            "ssim": _ssim_same(x, y, data_range, "constant"),
            "rmse": np.sqrt(np.mean((hx - hy) ** 2))}


def skimage_ref(window):
    def ref(pred_hu, ref_hu) -> dict:
        from skimage.metrics import peak_signal_noise_ratio, structural_similarity

        lo, hi = window
        x, y = np.clip(pred_hu, lo, hi) - lo, np.clip(ref_hu, lo, hi) - lo
        return {"psnr": peak_signal_noise_ratio(y, x, data_range=hi - lo),
                "ssim": structural_similarity(y, x, gaussian_weights=True, sigma=1.5,
                                              use_sample_covariance=False, data_range=hi - lo),
                "rmse": np.sqrt(np.mean((x - y) ** 2))}
    return ref


REFERENCES = {"redcnn": redcnn_ref, "dugan": dugan_ref, "corediff": corediff_ref,
              "skimage": skimage_ref((-160.0, 240.0)), "full": skimage_ref((-1024.0, 3072.0))}


def _as_model_sees(hu: np.ndarray) -> np.ndarray:
    """HU after the float32 normalisation round trip (what hu_metrics scores), float64."""
    return ctio.normalize(np.asarray(hu, np.float32)).astype(np.float64) * 4096 - 1024


def _check(images_hu: np.ndarray, refs_hu: np.ndarray) -> None:
    got = ctmetrics.slice_metrics(images_hu, refs_hu)
    assert set(got) == set(REFERENCES)
    for name, fn in REFERENCES.items():
        for i in range(len(images_hu)):
            want = fn(_as_model_sees(images_hu[i]), _as_model_sees(refs_hu[i]))
            assert abs(got[name]["psnr"][i] - want["psnr"]) < PSNR_TOL, (name, i, want)
            assert abs(got[name]["ssim"][i] - want["ssim"]) < SSIM_TOL, (name, i, want)
            assert got[name]["rmse"][i] == pytest.approx(want["rmse"], rel=1e-4), (name, i)


def test_protocols_equal_peer_code_on_real_slices(real_data):
    """Two held-out real L506 slices: quarter dose and a Gaussian-smoothed quarter dose
    against the full dose, every protocol against its peer's code."""
    root = real_data / "mayo_pairs" / "npy_redcnn"
    pairs = [(np.load(root / f"L506_{i}_input.npy") * 4096 - 1024,
              np.load(root / f"L506_{i}_target.npy") * 4096 - 1024) for i in (160, 200)]
    ld = np.stack([p[0] for p in pairs]).astype(np.float32)
    fd = np.stack([p[1] for p in pairs]).astype(np.float32)
    smooth = np.stack([gaussian_filter(x, 1.0) for x in ld])
    _check(np.concatenate([ld, smooth]), np.concatenate([fd, fd]))
    # the RED-CNN code's zero padding of unshifted HU differs from scikit-image's valid region
    got = ctmetrics.slice_metrics(ld[:1], fd[:1])
    assert abs(got["redcnn"]["ssim"][0] - got["skimage"]["ssim"][0]) > 5e-3


def test_protocols_equal_peer_code_on_random_images():
    rng = np.random.default_rng(5)
    ref = rng.uniform(-1100, 1500, (3, 40, 52)).astype(np.float32)
    ref[1] = gaussian_filter(ref[1], 3.0)
    img = (ref + rng.normal(0, 80, ref.shape)).astype(np.float32)
    img[2] = rng.uniform(-1100, 1500, (40, 52))  # unrelated: negative SSIM maps (DU-GAN clamps)
    _check(img, ref)


def test_validation_ssim_same_bits_with_onednn_on_and_off():
    """Mymodel's validation metric (hu_metrics, VALIDATION_PROTOCOL) and every protocol give
    the same bits with TF_ENABLE_ONEDNN_OPTS 0 and 1 (no oneDNN convolution in the path)."""
    code = ("import numpy as np, ctmetrics, ctio\n"
            "r = np.random.default_rng(2).uniform(-300, 400, (2, 48, 48)).astype('float32')\n"
            "x = r + np.random.default_rng(3).normal(0, 30, r.shape).astype('float32')\n"
            "m = ctmetrics.slice_metrics(x, r)\n"
            "tf = ctio.import_tensorflow()\n"
            "v = ctmetrics.hu_metrics(ctio.normalize(x)[..., None], ctio.normalize(r)[..., None])\n"
            "print(repr([m[p][k].tolist() for p in sorted(m) for k in sorted(m[p])]"
            " + [v['ssim'].numpy().tolist()]))\n")
    out = []
    for flag in ("0", "1"):
        env = {**os.environ, "TF_ENABLE_ONEDNN_OPTS": flag, "TF_CPP_MIN_LOG_LEVEL": "3"}
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             env=env, timeout=300, cwd=os.path.dirname(os.path.dirname(
                                 os.path.abspath(__file__))))
        assert res.returncode == 0, res.stderr[-2000:]
        out.append(res.stdout.strip().splitlines()[-1])
    assert out[0] == out[1]


def test_protocol_lines_name_the_peer_files():
    for name, files in (("redcnn", ["measure.py", "solver.py"]),
                        ("dugan", ["utils/metrics.py", "utils/dataset.py"]),
                        ("corediff", ["utils/measure.py", "models/basic_template.py",
                                      "models/corediff/corediff.py"])):
        text = ctmetrics.protocol_text(name)
        assert all(f in text for f in files), text
    assert "valid border" in ctmetrics.protocol_text("skimage")
    assert "zero border" in ctmetrics.protocol_text("redcnn")
    assert "reflect border, map clamped" in ctmetrics.protocol_text("dugan")

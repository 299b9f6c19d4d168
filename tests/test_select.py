"""ctselect: which epoch becomes generator_best (issue 25, checkpoint choice that suits a GAN)."""

import json

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter

import ctdata
import ctdose
import ctio
import ctselect
import cttexture


def _logs(psnr, peak=None, fav=None, noise=None):
    logs = {"val_psnr": psnr}
    if peak is not None:
        logs |= {"val_nps_peak_ratio": peak, "val_nps_fav_ratio": fav, "val_noise_ratio": noise}
    return logs


def _choose(criterion, epochs):
    keys = [ctselect.rank(criterion, logs, i + 1) for i, logs in enumerate(epochs)]
    return max(range(len(epochs)), key=lambda i: keys[i])


def test_auto_is_the_last_epoch_with_an_adversarial_term_and_psnr_without():
    assert ctselect.resolve("auto", 1.0) == "last"
    assert ctselect.resolve("auto", 0.0) == "psnr"
    assert ctselect.resolve("psnr", 1.0) == "psnr" and ctselect.resolve("texture", 0) == "texture"
    epochs = [_logs(31.0), _logs(32.0), _logs(30.5)]
    assert _choose("last", epochs) == 2 and _choose("psnr", epochs) == 1
    assert ctselect.reason("last", epochs[2], ctselect.rank("last", epochs[2], 3)) == \
        "the last epoch (--select last)"
    with pytest.raises(ValueError, match="criterion"):
        ctselect.resolve("ssim", 1.0)


def test_texture_rule_best_psnr_among_qualifying_then_closest_texture():
    """Qualifying epochs (peak and f_av within 15 %, noise removed) beat every other whatever
    their PSNR; among them the best PSNR; with none qualifying the closest texture among those
    that remove noise; an identity-like epoch (noise ratio >= 0.85) never wins on texture."""
    smooth = _logs(33.0, 0.60, 0.78, 0.60)  # the GAN's best-PSNR epoch: coarse grain
    ok_low = _logs(31.0, 0.90, 0.95, 0.70)
    ok_high = _logs(31.5, 1.10, 0.88, 0.75)
    near = _logs(32.0, 0.80, 0.90, 0.70)  # deviation 0.20
    identity = _logs(28.0, 1.00, 1.00, 0.99)
    assert _choose("psnr", [smooth, ok_low, ok_high, near, identity]) == 0
    assert _choose("texture", [smooth, ok_low, ok_high, near, identity]) == 2
    assert _choose("texture", [smooth, near, identity]) == 1  # closest: 0.20 beats 0.40
    assert _choose("texture", [_logs(30.0, 1, 1, 0.9), _logs(29.0, 1, 1, 0.95)]) == 0
    assert "within 15%" in ctselect.reason("texture", ok_high, ctselect.rank("texture", ok_high, 1))
    assert "closest (deviation 0.20)" in ctselect.reason("texture", near,
                                                        ctselect.rank("texture", near, 1))
    assert ctselect.rank("texture", {"g_adv": 0.3}, 1) is None  # no validation this epoch
    # no ROI in the validation slices: the PSNR decides
    assert _choose("texture", [_logs(30.0), _logs(31.0)]) == 1
    assert "no ROI" in ctselect.reason("texture", _logs(31.0), ctselect.rank("texture",
                                                                             _logs(31.0), 1))


@pytest.fixture(scope="module")
def fd_slices(tmp_path_factory):
    import ctfixtures

    demo = ctfixtures.make_demo(tmp_path_factory.mktemp("demo"), patients=1, slices=2, size=128)
    fd_dir = next(demo.glob("DEMO*/full_*"))
    out = []
    for rec in ctdata.discover(fd_dir, None, single_role="fd").records[:2]:
        fd, header = ctio.read_slice(rec.fd_path)
        out.append((fd, ctdose.pixel_size_mm(header, fd.shape, None),
                    cttexture.pixel_spacing_mm(header)))
    return fd_dir, out


def test_probe_ratios_of_analytic_denoisers(fd_slices):
    """Identity: every ratio 1; halving (D(x) = x / 2): the noise halves, the shape stays (peak
    and f_av ratios 1, qualifies); a Gaussian blur lowers f_av (coarser grain, fails)."""
    probe = ctselect.NoiseOnlyProbe(fd_slices[1], seed=3)
    same = probe.measure(lambda xs: xs)
    assert same == pytest.approx({k: 1.0 for k in ctselect.TEXTURE_FIELDS}, abs=1e-12)
    half = probe.measure(lambda xs: [0.5 * x for x in xs])
    assert half == pytest.approx({"val_nps_peak_ratio": 1.0, "val_nps_fav_ratio": 1.0,
                                  "val_noise_ratio": 0.5}, abs=1e-9)
    assert ctselect.rank("texture", _logs(30.0) | half, 1)[:2] == [1, 1]
    blur = probe.measure(lambda xs: [gaussian_filter(np.asarray(x, float), 1.5) for x in xs])
    assert blur["val_nps_fav_ratio"] < 0.85 and blur["val_noise_ratio"] < 0.7
    assert ctselect.rank("texture", _logs(30.0) | blur, 1)[:2] == [1, 0]


def test_probe_agrees_with_nps_sim(fd_slices, tiny_run, tmp_path):
    """The probe's ratios are Myevaluation --nps-sim's cncl / ldct figures of the same
    generator, seed and slices (two implementations of one definition); the generator is the
    tiny run's identity with every weight perturbed, so the ratios are not 1."""
    import Myevaluation
    import Mytest

    fd_dir, slices = fd_slices
    run_dir, model, weights = Mytest.resolve_run(str(tiny_run))
    gen = Mytest.load_generator(model, weights)
    rng = np.random.default_rng(0)
    for v in gen.trainable_weights:
        v.assign(v.numpy() + rng.normal(0, 0.05, v.shape).astype(np.float32))
    perturbed = tmp_path / "perturbed.weights.h5"
    gen.save_weights(perturbed)
    assert Myevaluation.main(["--nps-sim", str(fd_dir), "--run", str(tiny_run), "--weights",
                              str(perturbed), "--out", str(tmp_path / "nps"), "--max-slices",
                              "2", "--seed", "4"]) == 0
    report = json.loads((tmp_path / "nps" / "nps_sim.json").read_text())
    got = ctselect.NoiseOnlyProbe(slices, seed=4).measure(
        Mytest.Denoiser(gen, int(model["depth"]), 4))
    want = {"val_nps_peak_ratio": report["cncl"]["nps_peak"] / report["ldct"]["nps_peak"],
            "val_nps_fav_ratio": report["cncl"]["nps_mean_freq"] / report["ldct"]["nps_mean_freq"],
            "val_noise_ratio": report["cncl"]["noise_std"] / report["ldct"]["noise_std"]}
    assert got == pytest.approx(want, rel=1e-6)
    assert abs(got["val_noise_ratio"] - 1.0) > 0.01


def test_best_choice_says_which_epoch_and_why(tmp_path):
    """Mytest prints it beside generator_best: the epoch and the reason from state.json; a run
    made before --select chose by validation PSNR; no state: nothing."""
    import ctrun

    assert ctrun.best_choice(tmp_path) == ""
    (tmp_path / ctrun.STATE).mkdir()
    ctrun.write_state(tmp_path, {"epoch": 3, "weights": "w", "best_epoch": 2,
                                 "best_reason": "no validation: the last epoch"})
    assert ctrun.best_choice(tmp_path) == "epoch 2: no validation: the last epoch"
    ctrun.write_state(tmp_path, {"epoch": 3, "weights": "w", "best_epoch": 1})
    assert ctrun.best_choice(tmp_path) == "epoch 1: best validation PSNR"


def test_weights_kind_names_a_moving_average_from_the_run_config(tmp_path):
    """Mytest prints it beside a run's own weights: --ema-decay > 0 saved the moving average; a
    run without it (or made before the flag: migrated to 0) and a folder without a config say
    nothing."""
    import ctrun

    assert ctrun.weights_kind(tmp_path) == ""
    for train, want in (({"ema_decay": 0.999}, "moving average of the generator's weights, "
                                               "--ema-decay 0.999"),
                        ({"ema_decay": 0.0}, ""), ({"lr": 1e-3}, "")):
        ctrun.write_run_config(tmp_path, {"model": ctrun.model_config("small"), "train": train})
        assert ctrun.weights_kind(tmp_path) == want


def test_update_best_over_a_run_and_across_a_resume_with_another_criterion():
    """Epoch by epoch: psnr keeps the best score; a state of a run made before --select (only
    best_val_psnr) counts for psnr but not for last, whose every epoch then wins; a non-finite
    validation score never wins; without validation every epoch is the best (the last)."""
    state = {}
    chosen = [e for e, p in enumerate((30.0, 31.0, 30.5), 1)
              if ctselect.update_best(state, "psnr", _logs(p), e)]
    assert chosen == [1, 2] and state["best_epoch"] == 2 and state["best_val_psnr"] == 31.0
    legacy = {"best_val_psnr": 31.0, "best_epoch": 2}  # made before --select
    assert not ctselect.update_best(dict(legacy), "psnr", _logs(30.9), 3)
    resumed = dict(legacy)
    assert ctselect.update_best(resumed, "last", _logs(29.0), 3)
    assert resumed["best_epoch"] == 3 and resumed["best_criterion"] == "last"
    assert ctselect.update_best(resumed, "last", _logs(28.0), 4) and resumed["best_epoch"] == 4
    assert not ctselect.update_best(resumed, "last", _logs(float("nan")), 5)
    none = {}
    assert ctselect.update_best(none, "psnr", {"g_adv": 0.3}, 1)
    assert ctselect.update_best(none, "psnr", {"g_adv": 0.2}, 2)
    assert none["best_epoch"] == 2 and none["best_reason"] == "no validation: the last epoch"

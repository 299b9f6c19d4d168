"""CPU feature detection (ctmachine.cpu_features) and the --precision flags of Mytest.py and
Mytrain.py.

The bfloat16 checks hold on any CPU: TF emulates bfloat16 where the CPU lacks it, with the same
rounding, so only the speed depends on the machine, never these results."""

import json

import numpy as np
import pytest
from conftest import assert_one_error_line, cli

import ctio
import ctmachine

CPUINFO = """processor\t: 0
model name\t: Some CPU
flags\t\t: fpu sse2 avx avx2 fma avx512f avx512_vnni avx512_bf16 amx_tile vaes
cpu MHz\t\t: 2000.0
"""


def test_cpu_features_and_auto_precision():
    feats = ctmachine.cpu_features(CPUINFO)
    assert feats == {"avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile"}
    assert ctmachine.native_bfloat16(feats)
    assert ctmachine.auto_precision(feats) == ("bfloat16", "auto: this CPU has avx512_bf16")
    amd = ctmachine.cpu_features("flags : fpu avx2 fma\n")
    assert amd == {"avx2", "fma"} and not ctmachine.native_bfloat16(amd)
    precision, why = ctmachine.auto_precision(amd)
    assert precision == "float32" and "emulated" in why
    assert ctmachine.cpu_features("no flags line here\n") == frozenset()
    assert ctmachine.cpu_features() <= set(ctmachine.CPU_FLAGS)  # this machine: whatever it has


def perturbed_run(root):
    """A tiny run folder whose generator is NOT the identity (random weight perturbation)."""
    ctio.import_tensorflow()
    import Mymodel

    cfg = Mymodel.model_config("small", base_filters=8, depth=3, disc_filters=8)
    gen = Mymodel.build_generator(8, 3, cfg["norm"])
    rng = np.random.default_rng(0)
    gen.set_weights([w + rng.normal(0, 0.3, w.shape).astype(np.float32) * (np.std(w) + 1e-3)
                     for w in gen.get_weights()])
    run = root / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"model": cfg}))
    gen.save_weights(str(run / "generator_latest.weights.h5"))
    return run


def test_bfloat16_inference_close_to_float32(tmp_path, capsys):
    import keras

    import ctfixtures
    import Mytest

    run = perturbed_run(tmp_path)
    data = tmp_path / "npy"
    data.mkdir()
    rng = np.random.default_rng(1)
    for i in range(2):
        hu = ctfixtures.ellipse_phantom((64, 72), rng) + rng.normal(0, 20, (64, 72))
        np.save(data / f"P1_{i}_input.npy", (np.maximum(hu, -1024) + 1024) / 4096)
    preds = {}
    for precision in ("float32", "bfloat16"):
        out = tmp_path / precision
        assert Mytest.main(["--data", str(data), "--run", str(run), "--out", str(out),
                            "--precision", precision, "--no-figures"]) == 0
        assert f"precision: {precision} (--precision)" in capsys.readouterr().out
        preds[precision] = np.stack([np.load(p) for p in sorted((out / "P1").glob("*.npy"))])
    assert keras.mixed_precision.global_policy().name == "float32"  # restored
    f32, bf16 = preds["float32"], preds["bfloat16"]
    assert f32.dtype == bf16.dtype == np.float32 and f32.shape == (2, 64, 72)
    lo, hi = ctio.EVAL_WINDOW
    diff = np.abs(np.clip(f32, lo, hi) - np.clip(bf16, lo, hi))
    assert 0 < diff.max() < 5.0, diff.max()  # bfloat16 really ran, and a few HU at most


def test_float32_by_default_auto_only_when_asked_each_stated_once(tmp_path, capsys):
    """Issue 26 item 12: the same figures on every CPU unless the user asks for bfloat16."""
    import Mytest

    run = perturbed_run(tmp_path)
    data = tmp_path / "npy"
    data.mkdir()
    np.save(data / "P1_0_input.npy", np.full((32, 32), 0.25, np.float32))
    for extra, expected in (([], ("float32", "default: the same figures on every CPU; "
                                  "--precision bfloat16 is faster")),
                            (["--precision", "auto"], ctmachine.auto_precision())):
        Mytest.main(["--data", str(data), "--run", str(run), "--out",
                     str(tmp_path / f"o{len(extra)}"), "--no-figures", *extra])
        lines = [s for s in capsys.readouterr().out.splitlines() if s.startswith("precision:")]
        assert lines == [f"precision: {expected[0]} ({expected[1]})"]
    text = " ".join(Mytest.build_parser().format_help().split())
    assert "float32 (default)" in text and "faster inference" in text and "dB" in text


@pytest.mark.parametrize("script, args, needle", [
    ("Mytest.py", ["--precision", "float16"], "argument --precision: invalid choice"),
    ("Mytrain.py", ["--precision", "double"], "argument --precision: invalid choice"),
    ("Mytrain.py", ["--mixed-precision", "--precision", "bfloat16"],
     "--mixed-precision means --precision float16"),
])
def test_bad_precision_one_error_line(script, args, needle, tmp_path):
    assert_one_error_line(cli(script, *args, "--out", tmp_path / "o"), needle, code=2)


def test_bfloat16_training_step_keeps_float32_losses_without_loss_scaling():
    import keras

    import Mymodel

    cfg = Mymodel.model_config("small", base_filters=4, depth=2, disc_filters=4)
    with ctmachine.precision_policy("bfloat16"):
        gen, disc = Mymodel.build_models(cfg)
        gan = Mymodel.CNCLGAN(gen, disc)
        gan.compile(g_optimizer=keras.optimizers.Adam(1e-3),
                    d_optimizer=keras.optimizers.Adam(1e-3))
    assert not isinstance(gan.g_optimizer, keras.optimizers.LossScaleOptimizer)
    assert gen.layers[1].dtype_policy.compute_dtype == "bfloat16"
    assert all(v.dtype == "float32" for v in gen.trainable_variables)
    rng = np.random.default_rng(0)
    fd = rng.uniform(0.2, 0.3, (2, 16, 16, 1)).astype(np.float32)
    ld = fd + rng.normal(0, 0.01, fd.shape).astype(np.float32)
    logs = gan.train_on_batch(ld, fd, return_dict=True)
    assert logs and all(np.isfinite(float(v)) for v in logs.values()), logs
    content, noise = gen(ld)
    assert content.dtype == noise.dtype == "float32"


@pytest.mark.slow
def test_mytrain_bfloat16_trains_and_records_precision(mayo_tree, tmp_path):
    import csv

    out = tmp_path / "run"
    r = cli("Mytrain.py", "--data", mayo_tree, "--out", out, "--precision", "bfloat16",
                "--preset", "small", "--patch", "32", "--batch", "4", "--steps-per-epoch", "2",
                "--epochs", "1", "--val-slices", "1", "--verbose", "2", timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    train = json.loads((out / "config.json").read_text())["train"]
    assert train["precision"] == "bfloat16" and "mixed_precision" not in train  # one key
    with open(out / "history.csv") as f:
        row = next(csv.DictReader(f))
    assert all(np.isfinite(float(row[k])) for k in ("l1_content", "l1_noise", "val_psnr"))

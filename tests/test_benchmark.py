"""Mybenchmark.py: the analytic FLOP counter, flag validation and a --quick smoke run.

No assertion here depends on how fast this machine is: the smoke run only checks that every
figure is produced and sane (positive, MFU in a plausible range)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
REQUIRED = ("matmul_gflops", "train_patches_per_s", "train_mfu", "infer_slices_per_s",
            "infer_mfu", "loader_ratio", "mem_ratio")


def _run(*args, timeout=900):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    return subprocess.run([sys.executable, str(REPO / "Mybenchmark.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, cwd=REPO, env=env)


def test_flop_counter_matches_hand_count():
    import keras

    import Mybenchmark

    inner_in = keras.Input((None, None, 3))
    inner = keras.Model(inner_in, keras.layers.Conv2D(6, 1, name="c3")(inner_in), name="inner")
    inp = keras.Input((None, None, 2))
    x = keras.layers.Conv2D(4, 3, padding="same", name="c1")(inp)  # 8x8x4
    x = keras.layers.BatchNormalization()(x)  # not counted
    x = keras.layers.Conv2D(3, 2, strides=2, padding="same", name="c2")(x)  # 4x4x3
    x = keras.layers.MaxPooling2D(2)(x)  # 2x2x3, not counted
    x = inner(x)  # nested model: 2x2x6
    x = keras.layers.Dense(5, name="d")(x)  # per position: 6 -> 5
    model = keras.Model(inp, x)

    total, rows = Mybenchmark.conv_flops(model, (8, 8, 2))
    hand = {
        "c1": 2 * 8 * 8 * 3 * 3 * 2 * 4,  # 2 * H_out * W_out * k * k * C_in * C_out
        "c2": 2 * 4 * 4 * 2 * 2 * 4 * 3,  # stride 2, 'same': 8x8 -> 4x4
        "inner/c3": 2 * 2 * 2 * 1 * 1 * 3 * 6,
        "d": 2 * (2 * 2) * 6 * 5,  # Dense on a 2x2 map: 4 positions
    }
    assert {r["layer"]: r["flops"] for r in rows} == hand
    assert total == sum(hand.values()) == 11136
    assert rows[1]["in"] == [8, 8, 4] and rows[1]["out"] == [4, 4, 3]
    # One GAN training step: 3 generator forwards + 7 discriminator forwards.
    assert Mybenchmark.train_step_flops(100, 10) == 370
    assert Mybenchmark.train_step_flops(100, 10, adversarial=False) == 300


def test_flop_counter_agrees_with_tf_graph_for_cncl():
    """The layer walk and the Conv2D ops of the traced TF graph give the same count."""
    import tensorflow as tf

    import Mybenchmark
    import Mymodel

    gen, disc = Mymodel.build_models(Mymodel.model_config("small", base_filters=4,
                                                          disc_filters=4))
    g, _ = Mybenchmark.conv_flops(gen, (32, 48, 1))
    d, _ = Mybenchmark.conv_flops(disc, (32, 48, 3))
    assert g == Mybenchmark.graph_conv_flops(lambda x: gen(x, training=False),
                                             tf.TensorSpec([2, 32, 48, 1]))
    assert d == Mybenchmark.graph_conv_flops(lambda x: disc(x, training=False),
                                             tf.TensorSpec([2, 32, 48, 3]))
    # First encoder conv of each U-Net: 1 -> 4 channels at full resolution.
    _, rows = Mybenchmark.conv_flops(gen, (32, 48, 1))
    first = [r for r in rows if r["layer"].endswith("/enc0_a_conv")]
    assert len(first) == 2 and all(r["flops"] == 2 * 32 * 48 * 9 * 1 * 4 for r in first)


@pytest.mark.parametrize("args, needle", [
    (["--preset", "huge"], "unknown preset 'huge'"),
    (["--sections", "train,bogus"], "unknown section 'bogus'"),
    (["--infer-batches", "1,x"], "--infer-batches"),
    (["--no-such-flag"], "unrecognized arguments"),
])
def test_bad_flags_one_stderr_line_exit_2(args, needle):
    r = _run(*args, timeout=60)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], r.stderr
    assert r.stdout == ""


@pytest.mark.slow
def test_quick_smoke_run_writes_sane_json(tmp_path):
    out = tmp_path / "bench.json"
    r = _run("--quick", "--preset", "small", "--json", out)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(out.read_text())
    for key in REQUIRED:
        assert isinstance(res[key], (int, float)) and math.isfinite(res[key]), (key, res[key])
        assert res[key] > 0, (key, res[key])
    assert 0 < res["train_mfu"] < 1.5 and 0 < res["infer_mfu"] < 1.5
    m = res["machine"]
    assert m["cores"] >= 1 and m["tensorflow"] and m["keras"] and m["cpu_model"] is not None
    assert res["train"]["patch64_b16"]["flops_per_step"] > 0
    assert res["memory"]["status"] == "ok"
    for n in res["memory"]["counts"]:
        assert res["memory"][f"slices_{n}"]["outputs"] == n
    assert "train" in r.stdout and "mem_ratio" in r.stdout  # the table was printed

"""Mybenchmark.py: the analytic FLOP counter, flag validation and a --quick smoke run.

No assertion here depends on how fast this machine is: the smoke run only checks that every
figure is produced and sane (positive, MFU in a plausible range)."""

import json
import math

import pytest
from conftest import REPO, cli

import ctflops
import ctmachine
import ctprofile

REQUIRED = ("matmul_gflops", "train_patches_per_s", "train_mfu", "infer_slices_per_s",
            "infer_mfu", "loader_ratio", "mem_ratio", "eval_slices_per_s")


def _run(*args, timeout=900):
    return cli("Mybenchmark.py", *args, timeout=timeout)


def test_flop_counter_matches_hand_count():
    import keras

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

    total, rows = ctflops.conv_flops(model, (8, 8, 2))
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
    assert ctflops.train_step_flops(100, 10) == 370
    assert ctflops.train_step_flops(100, 10, adversarial=False) == 300


def test_flop_counter_agrees_with_tf_graph_for_cncl():
    """The layer walk and the Conv2D ops of the traced TF graph give the same count."""
    import tensorflow as tf

    import Mymodel

    gen, disc = Mymodel.build_models(Mymodel.model_config("small", base_filters=4,
                                                          disc_filters=4))
    g, _ = ctflops.conv_flops(gen, (32, 48, 1))
    d, _ = ctflops.conv_flops(disc, (32, 48, 3))
    assert g == ctflops.graph_conv_flops(lambda x: gen(x, training=False),
                                         tf.TensorSpec([2, 32, 48, 1]))
    assert d == ctflops.graph_conv_flops(lambda x: disc(x, training=False),
                                         tf.TensorSpec([2, 32, 48, 3]))
    # First encoder conv of each U-Net: 1 -> 4 channels at full resolution.
    _, rows = ctflops.conv_flops(gen, (32, 48, 1))
    first = [r for r in rows if r["layer"].endswith("/enc0_a_conv")]
    assert len(first) == 2 and all(r["flops"] == 2 * 32 * 48 * 9 * 1 * 4 for r in first)


@pytest.mark.parametrize("args, needle", [
    (["--preset", "huge"], "unknown preset 'huge'"),
    (["--sections", "train,bogus"], "unknown section 'bogus'"),
    (["--infer-batches", "1,x"], "--infer-batches"),
    (["--no-such-flag"], "unrecognized arguments"),
    (["--precision-rows", "bf16"], "argument --precision-rows: invalid choice"),
    (["--scale", "--scale-data", "."], "not a folder written by Mysimulate.py --mayo-like"),
    (["--adv-weight", "-1"], "--adv-weight must be >= 0"),
    (["--patch", "4"], "--patch >= 8"),
])
def test_bad_flags_one_stderr_line_exit_2(args, needle):
    r = _run(*args, timeout=60)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], r.stderr
    assert r.stdout == ""


EPYC = "vendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t: 1\ncpu MHz\t\t: 2445.406\n"
XEON = "vendor_id\t: GenuineIntel\ncpu family\t: 6\ncpu MHz\t\t: 1200.000\n"


def test_hardware_peak_from_flags_clock_and_cores():
    avx2 = frozenset({"avx2", "fma"})
    zen3 = ctmachine.hardware_peak(avx2, EPYC, "Thread(s) per core: 1\n", cpus=2)
    assert zen3["flop_per_cycle"] == 32 and zen3["cores"] == 2
    assert zen3["gflops"] == pytest.approx(2 * 2.445406 * 32)
    assert "cpu MHz" in zen3["clock_source"] and "2 cores x 2.45 GHz" in zen3["derivation"]
    assert zen3["lower_bound"] and "LOWER BOUND" in zen3["derivation"]  # the current clock
    avx512 = avx2 | {"avx512f", "avx512_vnni"}
    zen4 = ctmachine.hardware_peak(avx512, EPYC, "", cpus=4)
    assert zen4["flop_per_cycle"] == 32 and "Zen 4" in zen4["assumption"]
    # Intel with AVX-512: two FMA units assumed; lscpu's max clock wins; SMT siblings share units.
    xeon = ctmachine.hardware_peak(avx512, XEON, "Thread(s) per core:  2\nCPU max MHz: "
                                   "3500.0000\n", cpus=8)
    assert xeon["flop_per_cycle"] == 64 and "two 512-bit FMA units" in xeon["assumption"]
    assert xeon["cores"] == 4 and xeon["mhz"] == 3500 and xeon["gflops"] == 4 * 3.5 * 64
    assert not xeon["lower_bound"] and "LOWER" not in xeon["derivation"]
    assert ctmachine.hardware_peak(avx2, "", "", cpus=1)["gflops"] is None


def test_bf16_rows_only_where_native_unless_forced():
    import Mybenchmark

    amd, spr = frozenset({"avx2", "fma"}), frozenset({"avx512f", "amx_tile", "amx_bf16"})
    measured, why = Mybenchmark.bf16_decision("auto", amd)
    assert not measured and "emulated" in why and "--precision-rows all" in why
    measured, why = Mybenchmark.bf16_decision("all", amd)
    assert measured and "NOT a bfloat16 speed" in why
    assert Mybenchmark.bf16_decision("auto", spr) == (True, "auto: this CPU has amx_bf16")
    assert Mybenchmark.bf16_decision("float32", spr)[0] is False


def test_data_label_says_what_was_read(mayo_tree, tmp_path):
    import Mybenchmark
    import MyDataLoader_train as loader

    paired = loader.find_training_data([str(mayo_tree)], simulate_dose=0.25).records
    assert Mybenchmark.data_label(paired, "X", 0.25) == "X, 6 real QD/FD pairs (nothing simulated)"
    fd_only = Mybenchmark.write_dicom_series(tmp_path / "fd", 3, (32, 32))
    records = loader.find_training_data([str(fd_only)], simulate_dose=0.25).records
    assert Mybenchmark.data_label(records, "Y", 0.25) == \
        "Y, full dose only: quarter dose simulated (--simulate-dose 0.25)"
    mixed = paired[:2] + records[:1]
    assert "2 real QD/FD pairs + 1 full-dose-only" in Mybenchmark.data_label(mixed, "Z", 0.25)


def test_xla_trace_has_no_fake_op_breakdown():
    row = {"size": 64, "batch": 16}
    xla = ctprofile.trace_line("train", {**row, "trace": {"xla": True, "op_ms_total": 9.0,
                                                           "ops": {"XlaLaunch": 9.0}}})
    assert "no per-op breakdown" in xla and "%" not in xla
    plain = ctprofile.trace_line("train", {**row, "trace": {
        "conv_share": 0.75, "op_ms_total": 4.0, "ops": {"Conv2D": 3.0, "Relu": 1.0}}})
    assert "convolutions 75.0% of op time; then Relu 25.0%" in plain


def test_onednn_help_names_the_real_default():
    import Mybenchmark

    text = " ".join(Mybenchmark.build_parser().format_help().split())
    assert "default = leave TF's own choice" in text and "AVX-512 VNNI or AMX" in text
    assert "the project's" not in text


def test_mfu_under_a_steady_load_is_marked_disturbed_not_given_as_a_result():
    """MFU depends on the load itself: a busy loop beside `make bench` moved the bfloat16
    training MFU from 0.37 [0.35-0.43] idle to 0.52 [0.41-0.57] without disturbing any pair
    (2-core Sapphire Rapids, 2026-12-06). The same timings idle are a result; with others
    keeping a core busy the row's MFU column says disturbed."""
    import Mybenchmark
    from cttiming import Sample

    case = {"name": "64^2 x 16", "work": 40e9, "examples": 16}
    peak_case = {"work": 2 * 4096 ** 3}
    for others, status in ((0.0, "ok"), (0.9, "disturbed")):
        row = Mybenchmark.timed_row(case, [Sample(1.0, others)] * 3,
                                    [Sample(0.5, others)] * 3, peak_case)
        assert row["mfu_ratio"]["status"] == status
        assert row["mfu"] == pytest.approx(40e9 / (2 * 4096 ** 3 / 0.5))
        assert Mybenchmark._mfu_cell(row).endswith("disturbed") == (status == "disturbed")


@pytest.mark.slow
def test_quick_smoke_run_writes_sane_json(tmp_path):
    out = tmp_path / "bench.json"
    r = _run("--quick", "--preset", "small", "--json", out)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(out.read_text())
    for key in REQUIRED:
        if key.endswith("_mfu") and res[key] is None:  # an efficiency above 1: invalid, said so
            assert any(x["status"] == "invalid" for x in res["ratios"].values()), res["ratios"]
            continue
        assert isinstance(res[key], (int, float)) and math.isfinite(res[key]), (key, res[key])
        assert res[key] > 0, (key, res[key])
    for x in res["ratios"].values():  # every ratio from interleaved pairs, with its spread
        assert x["pairs"] >= 2 and x["status"] in ("ok", "disturbed", "invalid")
        assert x["status"] == "invalid" or x["min"] <= x["value"] <= x["max"]
        assert x["status"] != "invalid" or x["value"] is None
    m = res["machine"]
    assert m["cores"] >= 1 and m["tensorflow"] and m["keras"] and m["cpu_model"] is not None
    assert res["train"]["patch64_b16"]["flops_per_step"] > 0
    assert res["memory"]["status"] == "ok"
    for n in res["memory"]["counts"]:
        assert res["memory"][f"slices_{n}"]["outputs"] == n
    assert "train" in r.stdout and "mem_ratio" in r.stdout  # the table was printed
    assert m["kernels"] in ("oneDNN", "Eigen")
    assert set(m["cpu_features"]) <= set(ctmachine.CPU_FLAGS)
    assert m["hardware_peak"]["gflops"] > 0 and "FLOP/cycle" in m["hardware_peak"]["derivation"]
    assert "hardware peak:" in r.stdout and "bfloat16 rows:" in r.stdout
    measured, why = res["bf16"]["measured"], res["bf16"]["reason"]
    assert measured == ctmachine.native_bfloat16() and why
    for key in ("train_patches_per_s_bf16", "infer_slices_per_s_bf16", "infer_bf16_speedup"):
        assert (res[key] > 0) if measured else res[key] is None, (key, res[key])


def test_scale_section_is_opt_in_and_its_keys_are_documented():
    """--scale runs the scale section alone; the default run leaves it out (it takes about an
    hour); every top-level scale key is named in the README's benchmark section."""
    import Mybenchmark

    args = Mybenchmark.build_parser().parse_args(["--scale"])
    Mybenchmark.check_args(args)
    assert args.sections == ["scale"]
    args = Mybenchmark.build_parser().parse_args([])
    Mybenchmark.check_args(args)
    assert "scale" not in args.sections and set(Mybenchmark.RUNNERS) == set(Mybenchmark.SECTIONS)
    readme = (REPO / "README.md").read_text()
    bench = readme[readme.index("## Benchmark"):]
    missing = [k for k in Mybenchmark.SCALE_KEYS if f"`{k}`" not in bench]
    assert not missing, missing

"""Check the GPU path in about five minutes on one GPU (``make gpu-check``).

Usage::

    python gpu_check.py [--steps N] [--json FILE] [--keep DIR]

Prints the GPU and TensorFlow's build (CUDA / cuDNN from ``tf.sysconfig.get_build_info()``); trains
the paper preset a few steps on 512^2 slices, batch 2, in float32, float16 (Keras mixed_float16
with loss scaling, as ``Mytrain.py --precision float16``) and bfloat16, each without and with XLA
(``--jit``), and reports steps/s, MFU against the GPU's dense peak for that precision
(:data:`DENSE_PEAK_TFLOPS`) and the peak GPU memory (``tf.config.experimental.get_memory_info``);
then runs the command line end to end on a generated Mayo-like set of 20 slices of 512^2:
``Mytrain.py`` (paper preset, 3 steps), ``Mytest.py`` and ``Myevaluation.py``, with their rates.

On a machine without a GPU it prints the build information and "no GPU", and exits 0.
FLOPs are counted as in ``Mybenchmark.py`` (:mod:`ctflops`). float32 convolutions run in TF32 on
tensor cores where TF enables it (its default on Ampere and later); the float32 MFU is then
against the TF32 peak, and the line says which.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import numpy as np

import ctio
import cttiming

REPO = Path(__file__).resolve().parent
SIZE, BATCH, SLICES = 512, 2, 20
# Dense (no structured sparsity) peaks in TFLOP/s, from NVIDIA's datasheets: "NVIDIA H100 Tensor
# Core GPU" datasheet (SXM5, PCIe, NVL columns), "NVIDIA H200 Tensor Core GPU" datasheet, "NVIDIA
# A100 Tensor Core GPU" datasheet, "NVIDIA L4" and "NVIDIA L40S" datasheets. The datasheets give
# tensor-core figures "with sparsity"; the dense ones are half of those. Matched in this order on
# the device name TF reports (e.g. "NVIDIA H100 80GB HBM3" is the SXM5 part).
DENSE_PEAK_TFLOPS: tuple[tuple[str, dict[str, float]], ...] = (
    ("H200 NVL", {"float32": 60.0, "tf32": 417.5, "bfloat16": 835.5, "float16": 835.5}),
    ("H200", {"float32": 67.0, "tf32": 494.5, "bfloat16": 989.5, "float16": 989.5}),
    ("H100 PCIe", {"float32": 51.0, "tf32": 378.0, "bfloat16": 756.5, "float16": 756.5}),
    ("H100 NVL", {"float32": 60.0, "tf32": 417.5, "bfloat16": 835.5, "float16": 835.5}),
    ("H100", {"float32": 67.0, "tf32": 494.5, "bfloat16": 989.5, "float16": 989.5}),
    ("A100", {"float32": 19.5, "tf32": 156.0, "bfloat16": 312.0, "float16": 312.0}),
    ("L40S", {"float32": 91.6, "tf32": 183.0, "bfloat16": 366.5, "float16": 366.5}),
    ("L4", {"float32": 30.3, "tf32": 60.0, "bfloat16": 121.0, "float16": 121.0}),
)
CONFIGS = [(p, jit) for p in ("float32", "float16", "bfloat16") for jit in (False, True)]


def build_parser() -> argparse.ArgumentParser:
    ap = ctio.ArgumentParser(description="Check training, inference and evaluation on a GPU "
                             "(about five minutes); exits 0 saying 'no GPU' without one.",
                             formatter_class=ctio.HelpFormatter)
    ap.add_argument("--steps", type=int, default=5, help="timed training steps per configuration")
    ap.add_argument("--json", default=None, metavar="FILE", help="also write the figures here")
    ap.add_argument("--keep", default=None, metavar="DIR",
                    help="keep the generated data and outputs in DIR (new folder)")
    return ap


def dense_peak(device_name: str, precision: str, tf32: bool) -> tuple[Optional[float], str]:
    """``(FLOP/s, which peak)`` of ``device_name`` for ``precision`` (float32 uses the TF32 peak
    when ``tf32``); ``(None, why)`` for a GPU not in :data:`DENSE_PEAK_TFLOPS`."""
    key = "tf32" if precision == "float32" and tf32 else precision
    for name, peaks in DENSE_PEAK_TFLOPS:
        if name.lower() in device_name.lower():
            return peaks[key] * 1e12, f"{name} dense {key}"
    return None, f"no known peak for '{device_name}'"


def gpu_facts(tf) -> dict:
    """TF's build (CUDA, cuDNN) and the visible GPUs with their names and compute capability."""
    build = dict(tf.sysconfig.get_build_info())
    gpus = []
    for d in tf.config.list_physical_devices("GPU"):
        details = tf.config.experimental.get_device_details(d)
        gpus.append({"device": d.name, "name": details.get("device_name", "?"),
                     "compute_capability": details.get("compute_capability")})
    return {"tensorflow": tf.__version__, "cuda": build.get("cuda_version"),
            "cudnn": build.get("cudnn_version"), "cuda_build": build.get("is_cuda_build"),
            "gpus": gpus}


def train_config(cfg: dict, precision: str, jit: bool, steps: int, peak: Optional[float]) -> dict:
    """Paper preset GAN steps at SIZE^2 x BATCH in ``precision`` (Mytrain.py's model and
    policy), with or without XLA: first step, steps/s, MFU and peak GPU memory."""
    import keras

    import ctflops
    import ctmachine
    import Mymodel

    tf = ctio.import_tensorflow()
    tf.config.experimental.reset_memory_stats("GPU:0")
    with ctmachine.precision_policy(precision):
        gen, disc = Mymodel.build_models(cfg)
        gan = Mymodel.CNCLGAN(gen, disc)
        gan.compile(g_optimizer=keras.optimizers.Adam(1e-4), d_optimizer=keras.optimizers.Adam(
            1e-4), jit_compile=jit)
    rng = np.random.default_rng(0)
    fd = rng.uniform(0.2, 0.3, (BATCH, SIZE, SIZE, 1)).astype(np.float32)
    ld = fd + rng.normal(0, 0.01, fd.shape).astype(np.float32)
    it = iter(tf.data.Dataset.from_tensors((ld, fd)).repeat())
    gan.make_train_function()

    def step():
        logs = gan.train_function(it)
        return {k: float(v) for k, v in logs.items()}  # waits for the step

    t0 = time.perf_counter()
    logs = step()
    first = time.perf_counter() - t0
    step()
    samples = cttiming.interleave({"step": step}, steps, min_s=0)["step"]
    rate = cttiming.rate(samples, BATCH)
    flops = ctflops.model_flops(cfg, SIZE, SIZE)["train_step"] * BATCH
    achieved = flops / rate["median_s"]
    return {"precision": precision, "jit": jit, "first_step_s": first,
            "step_s": rate["median_s"], "slices_per_s": rate["median"],
            "tflops": achieved / 1e12, "mfu": achieved / peak if peak else None,
            "peak_memory_gib": tf.config.experimental.get_memory_info("GPU:0")["peak"] / 2 ** 30,
            "losses_finite": bool(all(np.isfinite(v) for v in logs.values()))}


def run_command(args: list, timeout: float, pattern: str) -> dict:
    """Run one CLI of this repository; its exit code, wall seconds and the match of ``pattern``
    (slices, seconds) in its stdout."""
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True,
                       cwd=REPO, timeout=timeout, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    out = {"command": " ".join(map(str, args)), "exit_code": r.returncode,
           "seconds": time.perf_counter() - t0, "stderr_tail": r.stderr.strip()[-300:]}
    m = re.search(pattern, r.stdout)
    if m:
        out["slices"], out["work_s"] = int(m[1]), float(m[2])
        out["slices_per_s"] = out["slices"] / out["work_s"]
    return out


def pipeline(work: Path) -> dict:
    """Mysimulate.py --mayo-like (2 x 10 pairs of 512^2) -> Mytrain.py (paper, 3 steps of whole
    slices) -> Mytest.py on the 20 slices -> Myevaluation.py."""
    data, run = work / "data", work / "run"
    out = {"simulate": run_command(["Mysimulate.py", "--mayo-like", data, "--patients", 2,
                                "--slices", SLICES // 2, "--size", SIZE], 300, r"$^")}
    out["train"] = run_command(["Mytrain.py", "--data", data, "--out", run, "--preset", "paper",
                            "--patch", 0, "--batch", BATCH, "--epochs", 1, "--steps-per-epoch",
                            3, "--val-patients", "none", "--verbose", 2], 600, r"$^")
    out["test"] = run_command(["Mytest.py", "--data", data, "--run", run, "--out", work / "test",
                           "--no-figures"], 600, r"denoised (\d+) slice\(s\) in ([\d.]+) s")
    out["evaluate"] = run_command(["Myevaluation.py", "--pred", work / "test"], 600,
                              r"scored (\d+) slices in ([\d.]+) s")
    return out


def report(facts: dict, rows: list[dict], cli: dict, peak_note: str) -> None:
    for g in facts["gpus"]:
        print(f"GPU: {g['name']} ({g['device']}, compute capability {g['compute_capability']})")
    print(f"TensorFlow {facts['tensorflow']}: CUDA {facts['cuda']}, cuDNN {facts['cudnn']}")
    print(f"training, paper preset, {SIZE}^2 x batch {BATCH} ({peak_note}):")
    for r in rows:
        mfu = "-" if r["mfu"] is None else f"{r['mfu']:.2f}"
        print(f"  {r['precision']:<8} jit {'on ' if r['jit'] else 'off'}  first step "
              f"{r['first_step_s']:6.1f} s  {r['slices_per_s']:7.2f} slices/s  "
              f"{r['tflops']:7.1f} TFLOP/s  MFU {mfu}  peak memory {r['peak_memory_gib']:.2f} "
              f"GiB{'' if r['losses_finite'] else '  NON-FINITE LOSS'}")
    for name, c in cli.items():
        rate = f", {c['slices_per_s']:.2f} slices/s" if "slices_per_s" in c else ""
        print(f"{name}: exit {c['exit_code']} in {c['seconds']:.1f} s{rate}"
              + (f"  ({c['stderr_tail'][-120:]})" if c["exit_code"] else ""))


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.steps < 1:
        raise ctio.CTDataError("--steps must be >= 1")
    if args.keep and Path(args.keep).exists():
        raise ctio.CTDataError(f"--keep {args.keep}: already exists")
    tf = ctio.import_tensorflow()
    facts = gpu_facts(tf)
    if not facts["gpus"]:
        print(f"no GPU: TensorFlow {facts['tensorflow']} (CUDA build: "
              f"{bool(facts['cuda_build'])}, CUDA {facts['cuda']}, cuDNN {facts['cudnn']}) sees "
              "no GPU on this machine; nothing to check")
        return 0
    import ctmachine
    import Mymodel

    ctmachine.set_precision("float32")
    cfg = Mymodel.model_config("paper")
    name = facts["gpus"][0]["name"]
    tf32 = bool(tf.config.experimental.tensor_float_32_execution_enabled())
    rows = []
    for precision, jit in CONFIGS:
        peak, which = dense_peak(name, precision, tf32)
        rows.append({**train_config(cfg, precision, jit, args.steps, peak), "peak": which})
    note = "MFU against " + "; ".join(dict.fromkeys(r["peak"] for r in rows)) + (
        "; TF32 on for float32" if tf32 else "")
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="cncl_gpu_check_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        cli = pipeline(work)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    report(facts, rows, cli, note)
    if args.json:
        with ctio.atomic_path(args.json) as tmp:
            Path(tmp).write_text(json.dumps({"facts": facts, "train": rows, "cli": cli},
                                            indent=1) + "\n")
    return 0 if all(c["exit_code"] == 0 for c in cli.values()) else 1


if __name__ == "__main__":
    ctio.run_cli(main)

"""This machine's compute facts: CPU flags, kernel library, FMA hardware peak, precision policy.

The one place that reads /proc/cpuinfo and lscpu. :func:`hardware_peak` is physical cores x clock
x float32 FLOP/cycle of the widest FMA (vendor optimisation manuals: Intel 64 and IA-32
Architectures Optimization Reference Manual, AMD Zen 4 software optimisation guide);
``--precision`` names map to Keras dtype policies (:data:`PRECISION_POLICIES`).
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np

import cttiming
from ctio import CTDataError, import_tensorflow

# /proc/cpuinfo flags that decide TF's CPU kernels and which precisions run natively.
CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16")
BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # native bfloat16 arithmetic; without them TF emulates it
# --precision name -> Keras dtype policy. Variables, outputs and losses stay float32 (Mymodel's
# heads are float32 layers); float16 needs loss scaling (Mymodel.CNCLGAN.compile adds it).
PRECISION_POLICIES = {"float32": "float32", "bfloat16": "mixed_bfloat16",
                      "float16": "mixed_float16"}


def cpu_features(cpuinfo: Optional[str] = None) -> frozenset[str]:
    """The :data:`CPU_FLAGS` this CPU has, from the ``flags`` line of ``/proc/cpuinfo``.

    ``cpuinfo`` is that file's text (read when None). Empty where there is no such file (macOS,
    Windows): nothing is assumed, so such machines run float32.
    """
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
        except OSError:
            return frozenset()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return frozenset(value.split()) & frozenset(CPU_FLAGS)
    return frozenset()


def choose_cpu_kernels(onednn_helps: bool, why: str,
                       features: Optional[frozenset[str]] = None) -> Optional[str]:
    """Turn TF's oneDNN CPU kernels on for a workload they speed up, where TF would not.

    TF enables oneDNN by itself only on CPUs with AVX-512 VNNI or AMX (there it was measured
    fast for every workload here: MFU 0.85-0.97). Elsewhere TF uses Eigen; on such a CPU (the
    2-core AVX2 AMD EPYC of development) oneDNN made small-preset patch training 1.8x faster
    but the paper network on whole 512^2 slices more than 25x slower. So: when the user has not
    set ``TF_ENABLE_ONEDNN_OPTS``, TF is not imported yet, the CPU is not one where TF decides
    by itself, and ``onednn_helps``, set it to 1. Results do not depend on this choice beyond
    float rounding (the tests run both). Returns the sentence to print once, or None.
    """
    if "TF_ENABLE_ONEDNN_OPTS" in os.environ or "tensorflow" in sys.modules or not onednn_helps:
        return None
    features = cpu_features() if features is None else features
    if "avx512_vnni" in features or "amx_tile" in features or "avx2" not in features:
        return None
    os.environ["TF_ENABLE_ONEDNN_OPTS"] = "1"
    return (f"CPU kernels: oneDNN ({why}; TF would use Eigen on this CPU; set "
            "TF_ENABLE_ONEDNN_OPTS=0 or 1 to choose yourself)")


def native_bfloat16(features: Optional[frozenset[str]] = None) -> bool:
    """Whether the CPU computes bfloat16 natively (AVX-512 BF16 or AMX-BF16)."""
    features = cpu_features() if features is None else features
    return any(f in features for f in BF16_FLAGS)


def auto_precision(features: Optional[frozenset[str]] = None) -> tuple[str, str]:
    """``(precision, why)`` for ``--precision auto``: bfloat16 where the CPU has it natively."""
    features = cpu_features() if features is None else features
    have = [f for f in BF16_FLAGS if f in features]
    if have:
        return "bfloat16", f"auto: this CPU has {' and '.join(have)}"
    return "float32", (f"auto: this CPU has neither {' nor '.join(BF16_FLAGS)}, so bfloat16 "
                       "would be emulated (slower)")


def set_precision(precision: str) -> str:
    """Set the Keras global dtype policy of ``precision`` (:data:`PRECISION_POLICIES`) for models
    built from now on; returns the previous policy name."""
    if precision not in PRECISION_POLICIES:
        raise CTDataError(f"unknown precision '{precision}' (choose from: "
                          f"{', '.join(PRECISION_POLICIES)})")
    import_tensorflow()  # quietly: a bare "import keras" loads TF with its stderr chatter
    import keras

    previous = keras.mixed_precision.global_policy().name
    keras.mixed_precision.set_global_policy(PRECISION_POLICIES[precision])
    return previous


@contextlib.contextmanager
def precision_policy(precision: str) -> Iterator[None]:
    """Build models in ``precision`` inside the block (layers keep the policy they were built
    with); the previous global policy is restored on exit."""
    previous = set_precision(precision)  # imports TF quietly first
    import keras

    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(previous)


def onednn_enabled() -> Optional[bool]:
    """Whether TF's oneDNN CPU kernels are on in this process (None if TF cannot say)."""
    try:
        from tensorflow.python.util import _pywrap_util_port

        return bool(_pywrap_util_port.IsMklEnabled())
    except (ImportError, AttributeError):
        return None


def kernel_library(onednn: Optional[bool]) -> str:
    """The CPU kernel library TF ran: oneDNN, Eigen, or unknown."""
    return "oneDNN" if onednn else ("Eigen" if onednn is not None else "unknown")


def _text_fields(text: str) -> dict[str, str]:
    """``key: value`` lines (/proc/cpuinfo, lscpu) -> {key: value}, the first of each key."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            out.setdefault(key.strip(), value.strip())
    return out


def flop_per_cycle(features: frozenset[str], vendor: str, family: int) -> tuple[int, str]:
    """float32 FLOP per cycle per core of the widest FMA in ``features`` (:func:`cpu_features`),
    with the assumption it rests on."""
    if "avx512f" in features:
        if vendor == "AuthenticAMD" and family == 25:
            return 32, ("AVX-512 on AMD Zen 4, which splits each 512-bit FMA into two 256-bit "
                        "halves: 2 x 256-bit FMA units x 8 lanes x 2")
        return 64, ("AVX-512: 2 FMA units x 16 lanes x 2, assuming two 512-bit FMA units "
                    "(Xeon Gold/Platinum, Sapphire Rapids, Zen 5; parts with one unit reach 32)")
    if {"avx2", "fma"} <= features:
        return 32, "AVX2 + FMA: 2 FMA units x 8 lanes x 2 (assumed two 256-bit FMA units)"
    return 16, "no FMA flag: AVX/SSE add + multiply, 16 at most (assumed)"


def hardware_peak(features: frozenset[str], cpuinfo: Optional[str] = None,
                  lscpu: Optional[str] = None, cpus: Optional[int] = None) -> dict:
    """FMA peak of this CPU: physical cores x clock x float32 FLOP/cycle/core, and how it was
    derived. Clock: lscpu "CPU max MHz" when it reports one, else /proc/cpuinfo "cpu MHz", the
    current clock, and then the figure is a lower bound (``lower_bound``) and says so."""
    if cpuinfo is None:
        with contextlib.suppress(OSError):
            cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
    if lscpu is None:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10,
                                   env={**os.environ, "LC_ALL": "C"}).stdout
    info, ls = _text_fields(cpuinfo or ""), _text_fields(lscpu or "")
    if cpus is None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else \
            (os.cpu_count() or 1)
    threads = int(ls.get("Thread(s) per core", "1") or 1)
    cores = max(1, cpus // max(1, threads))
    lower = not ls.get("CPU max MHz")
    if not lower:
        mhz, clock = float(ls["CPU max MHz"]), "lscpu CPU max MHz"
    elif info.get("cpu MHz"):
        mhz, clock = float(info["cpu MHz"]), "/proc/cpuinfo cpu MHz (current clock; no max MHz)"
    else:
        return {"gflops": None, "derivation": "no clock found (no lscpu max MHz, no cpu MHz)"}
    fpc, assumption = flop_per_cycle(features, info.get("vendor_id", ""),
                                     int(info.get("cpu family", "0") or 0))
    gflops = cores * mhz / 1e3 * fpc
    bound = ("; a LOWER BOUND: lscpu reports no maximum clock, and the cores may run above "
             "the current one (turbo)") if lower else ""
    return {"gflops": gflops, "cores": cores, "threads_per_core": threads, "mhz": mhz,
            "flop_per_cycle": fpc, "clock_source": clock, "assumption": assumption,
            "lower_bound": lower,
            "derivation": f"{cores} cores x {mhz / 1e3:.2f} GHz ({clock}) x {fpc} float32 "
                          f"FLOP/cycle ({assumption}) = {gflops:.0f} GFLOP/s{bound}"}


def machine_info(tf, keras) -> dict:
    cpu = platform.processor() or ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 0
    gpus = [d.name for d in tf.config.list_physical_devices("GPU")]
    features = cpu_features()
    return {
        "onednn": onednn_enabled(), "kernels": kernel_library(onednn_enabled()),
        "cpu_features": sorted(features), "native_bfloat16": native_bfloat16(features),
        "hardware_peak": hardware_peak(features),
        "cpu_model": cpu, "cores": cores, "gpus": gpus, "platform": platform.platform(),
        "python": platform.python_version(), "tensorflow": tf.__version__,
        "keras": keras.__version__, "numpy": np.__version__,
        "intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads(),
        "inter_op_threads": tf.config.threading.get_inter_op_parallelism_threads(),
        "env": {k: os.environ.get(k) for k in ("TF_ENABLE_ONEDNN_OPTS", "OMP_NUM_THREADS",
                                               "TF_XLA_FLAGS", "CUDA_VISIBLE_DEVICES")},
        "load_start": list(np.round(os.getloadavg(), 2)),
    }


# --- The measured peak: square matmuls (the denominator of every MFU) ----------------------------
REPO = Path(__file__).resolve().parent


def _load() -> float:
    return round(os.getloadavg()[0], 2)


def matmul_case(n: int, dtype: str) -> dict:
    """A ready square matmul of ``dtype`` (tf.function): ``{"fn", "work" (FLOPs), ...}``."""
    tf = import_tensorflow()

    @tf.function
    def mm(a, b):
        return tf.matmul(a, b)

    a = tf.cast(tf.random.normal([n, n]), dtype)
    b = tf.cast(tf.random.normal([n, n]), dtype)
    case = {"fn": lambda: mm(a, b).numpy(), "work": 2 * n ** 3, "n": n, "dtype": dtype}
    case["fn"]()  # traces
    case["fn"]()
    return case


def bench_matmul(n: int, repeats: int, bf16: bool = False) -> dict:
    """float32 (on a GPU also bf16 / fp16; with ``bf16`` also bfloat16 on a CPU) square matmul
    FLOP/s, the dtypes interleaved, median."""
    tf = import_tensorflow()
    on_gpu = bool(tf.config.list_physical_devices("GPU"))
    dtypes = ["float32"] + (["bfloat16", "float16"] if on_gpu else ["bfloat16"] if bf16 else [])
    out: dict[str, Any] = {"n": n, "device": "GPU" if on_gpu else "CPU",
                           "onednn": onednn_enabled(), "load_before": _load()}
    cases = {dt: matmul_case(n, dt) for dt in dtypes}
    samples = cttiming.interleave({dt: c["fn"] for dt, c in cases.items()}, repeats)
    for dt, s in samples.items():
        r = cttiming.rate(s, 2 * n ** 3 / 1e9)
        out[dt] = {"median_s": r["median_s"], "min_s": min(x.seconds for x in s),
                   "max_s": max(x.seconds for x in s), "repeats": r["repeats"],
                   "gflops": r["median"], "gflops_best": r["max"]}
    out["gflops"] = out["float32"]["gflops"]
    out["load_after"] = _load()
    return out


def matmul_other_backend(n: int, repeats: int, timeout: float = 600) -> Optional[dict]:
    """float32 matmul with TF's oneDNN setting flipped, measured in a fresh process (TF reads
    TF_ENABLE_ONEDNN_OPTS once, at import). None if that process fails."""
    flip = "0" if onednn_enabled() else "1"
    env = {**os.environ, "TF_ENABLE_ONEDNN_OPTS": flip, "TF_CPP_MIN_LOG_LEVEL": "3"}
    code = ("import json, ctmachine as M; "
            f"print(json.dumps(M.bench_matmul({int(n)}, {int(repeats)})))")
    try:
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           env=env, cwd=REPO, timeout=timeout)
        return json.loads(r.stdout.strip().splitlines()[-1]) if r.returncode == 0 else None
    except (subprocess.TimeoutExpired, json.JSONDecodeError, IndexError):
        return None

"""Where a TensorFlow step spends its time: a profiler trace and the share of op time per op type.

Reads the XPlane protobuf the TF profiler writes (``tf.profiler.experimental``; TensorFlow's
"Optimize TensorFlow performance using the Profiler" guide); with XLA (``--jit on``) the executor
runs one compiled program per call, so there is no per-op breakdown to give.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import ctio


def trace_case(case: dict, trace_dir: str, calls: int, jit: bool) -> dict:
    """Profile ``calls`` calls of ``case["fn"]`` into ``trace_dir``; op_breakdown of it."""
    t0 = time.time()
    with _profiler(trace_dir):
        for _ in range(calls):
            case["fn"]()
    return op_breakdown(trace_dir, t0, jit)


@contextlib.contextmanager
def _profiler(logdir: str):
    tf = ctio.import_tensorflow()
    tf.profiler.experimental.start(logdir)
    try:
        yield
    finally:
        tf.profiler.experimental.stop()


def op_breakdown(logdir: str, since: float = 0.0, jit: bool = False) -> dict:
    """Time per TF op type in the newest profiler trace under ``logdir`` written after ``since``.

    With ``jit`` (XLA) the executor runs one compiled cluster op per call, so the trace has no
    per-op breakdown: ``{"xla": True, "ops": ...}`` without ``conv_share``.

    Sums the durations of the executor's op events (``tf_Compute`` threads of the host plane;
    ops of the two U-Nets may overlap in time, so this is a share of op time, not of wall time).
    Returns ``{"conv_share", "ops": {type: ms}}`` with every Conv2D variant (forward, fused,
    backprop input / filter, oneDNN) counted as convolution; ``{}`` if no trace is readable.
    """
    try:
        from tensorflow.tsl.profiler.protobuf import xplane_pb2
    except ImportError:
        return {}
    files = [p for p in Path(logdir).rglob("*.xplane.pb") if p.stat().st_mtime >= since]
    if not files:
        return {}
    space = xplane_pb2.XSpace()
    space.ParseFromString(max(files, key=lambda p: p.stat().st_mtime).read_bytes())
    ms: dict[str, float] = {}
    for plane in space.planes:
        meta = plane.event_metadata
        for line in plane.lines:
            if not line.name.startswith("tf_Compute"):
                continue
            for ev in line.events:
                name = meta[ev.metadata_id].name
                if ":" not in name or "::" in name:  # executor wrappers, not ops
                    continue  # (ExecutorState::Process, ParallelFor)
                op = name.rsplit(":", 1)[1]
                ms[op] = ms.get(op, 0.0) + ev.duration_ps / 1e9
    total = sum(ms.values())
    if jit:  # also when the compiled program left no executor op events at all
        top = dict(sorted(((k, round(v, 1)) for k, v in ms.items()), key=lambda kv: -kv[1])[:5])
        return {"xla": True, "op_ms_total": total, "ops": top}
    if not total:
        return {}
    conv = sum(v for k, v in ms.items() if "Conv2D" in k)
    top = dict(sorted(((k, round(v, 1)) for k, v in ms.items()), key=lambda kv: -kv[1])[:15])
    return {"conv_share": conv / total, "op_ms_total": total, "ops": top}


def trace_line(section: str, t: dict) -> str:
    """One line on the profiler trace of a train / infer row (``t["trace"]``, op_breakdown)."""
    tr = t["trace"]
    head = f"trace {section} {t['size']}^2 x {t['batch']}: "
    if tr.get("xla"):
        return (head + "XLA-compiled (--jit on): the executor runs one compiled program per "
                f"call ({', '.join(tr['ops']) or 'no op events'}), so the trace has no per-op "
                "breakdown; open the trace folder in TensorBoard's profiler for XLA's own ops")
    rest = {k: v for k, v in tr["ops"].items() if "Conv2D" not in k}
    top = ", ".join(f"{k} {100 * v / tr['op_ms_total']:.1f}%" for k, v in list(rest.items())[:6])
    return head + f"convolutions {100 * tr['conv_share']:.1f}% of op time; then {top}"

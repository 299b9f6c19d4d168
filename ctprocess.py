"""Measure a command as a whole: its peak memory (RSS), when each stdout line appeared, and
whether the DICOM files it derived form one series.

``ru_maxrss`` of the process, from ``os.wait4`` in a small probe process that starts it
(getrusage(2); Linux reports KiB, macOS bytes), cross-checked by polling ``/proc/PID/status``
``VmHWM`` (proc(5)). No TensorFlow.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional

import numpy as np

REPO = Path(__file__).resolve().parent


# Runs one command and reports its memory as JSON on stdout. It is started as a small fresh
# process because Linux carries the RSS high-water mark of a process across execve: a child
# exec'd straight from this (TensorFlow-sized) benchmark would report our peak, not its own.
_RSS_PROBE = r"""
import json, os, subprocess, sys, time
def status(pid):
    out = {}
    try:
        for line in open(f"/proc/{pid}/status"):
            key, _, val = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(val.split()[0])
    except OSError:
        pass
    return out
import threading
timeout = float(sys.argv[1])
err = open(sys.argv[2], "wb")
keep_lines = sys.argv[3] == "lines"
t0 = time.perf_counter()
proc = subprocess.Popen(sys.argv[4:], stdout=subprocess.PIPE if keep_lines else
                        subprocess.DEVNULL, stderr=err)
lines = []
def read_lines():
    for raw in proc.stdout:
        if len(lines) < 1000:
            lines.append([round(time.perf_counter() - t0, 3),
                          raw.decode(errors="replace").rstrip()[:300]])
if keep_lines:
    reader = threading.Thread(target=read_lines, daemon=True)
    reader.start()
hwm, samples = 0, []
while True:
    pid, st, ru = os.wait4(proc.pid, os.WNOHANG)
    if pid:
        break
    if time.perf_counter() - t0 > timeout:
        proc.kill()
        pid, st, ru = os.wait4(proc.pid, 0)
        break
    s = status(proc.pid)
    hwm = max(hwm, s.get("VmHWM", 0))
    if "VmRSS" in s:
        samples.append(s["VmRSS"])
    time.sleep(0.05)
if keep_lines:
    reader.join(10)
print(json.dumps({"maxrss": ru.ru_maxrss, "hwm_kb": hwm, "rss_kb": samples, "lines": lines,
                  "code": os.waitstatus_to_exitcode(st), "seconds": time.perf_counter() - t0}))
"""


def peak_rss_of(cmd: list[str], env: dict, timeout: float, lines: bool = False) -> dict:
    """Run ``cmd`` to the end and measure its memory.

    ``peak_rss_mb`` is ru_maxrss of that process (os.wait4 in a small probe process that starts
    it); ``polled_hwm_mb`` and ``rss_samples_mb`` (10 evenly spaced moments) come from polling
    /proc/PID/status every 50 ms: a cross-check, and RSS over time (a leak is a rising tail).
    With ``lines``, ``lines`` holds its stdout lines as ``[seconds since start, text]``.
    """
    with tempfile.NamedTemporaryFile(suffix=".err") as err:
        probe = subprocess.run([sys.executable, "-c", _RSS_PROBE, str(timeout), err.name,
                                "lines" if lines else "-", *cmd],
                               capture_output=True, text=True, env=env, cwd=REPO)
        tail = Path(err.name).read_text(errors="replace").strip().splitlines()[-1:] or [""]
    if probe.returncode != 0:
        raise RuntimeError(f"memory probe failed: {probe.stderr.strip()[-300:]}")
    r = json.loads(probe.stdout.strip().splitlines()[-1])
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    rss = r["rss_kb"]
    picks = [rss[int(i * (len(rss) - 1) / 9)] / 1024 for i in range(10)] if rss else []
    return {"peak_rss_mb": r["maxrss"] * scale / 2 ** 20,
            "polled_hwm_mb": r["hwm_kb"] / 1024 or None,
            "rss_samples_mb": [round(v, 1) for v in picks],
            "seconds": r["seconds"], "exit_code": r["code"], "stderr_tail": tail[0][:300],
            **({"lines": r["lines"]} if lines else {})}


def line_time(lines: list, pattern: str, after: float = -1.0) -> Optional[float]:
    """Seconds since start of the first stdout line (``peak_rss_of(lines=True)``) matching the
    regular expression ``pattern`` after ``after`` seconds."""
    return next((t for t, text in lines if t > after and re.search(pattern, text)), None)


def check_derived_series(out: Path, source: Path) -> dict:
    """Whether Mytest.py's derived DICOM files in ``out`` form one series: one
    SeriesInstanceUID, InstanceNumbers unique and monotonic along the table, and each file
    with its source's position, orientation, pixel spacing and size."""
    import pydicom

    src = {}
    for f in sorted(source.iterdir()):
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        src[round(float(ds.ImagePositionPatient[2]), 3)] = ds
    files = sorted(out.rglob("*.dcm"))
    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    headers.sort(key=lambda d: float(d.ImagePositionPatient[2]))
    numbers = [int(d.InstanceNumber) for d in headers]
    steps = np.diff(numbers)
    geometry = all(
        (s := src.get(round(float(d.ImagePositionPatient[2]), 3))) is not None
        and list(d.ImagePositionPatient) == list(s.ImagePositionPatient)
        and list(d.ImageOrientationPatient) == list(s.ImageOrientationPatient)
        and list(d.PixelSpacing) == list(s.PixelSpacing)
        and (d.Rows, d.Columns) == (s.Rows, s.Columns) for d in headers)
    one = {"files": len(files), "series_uids": len({d.SeriesInstanceUID for d in headers}),
           "instance_numbers_monotonic": bool(len(set(numbers)) == len(numbers) and (
               (steps > 0).all() or (steps < 0).all())),
           "source_geometry": bool(geometry)}
    one["one_series"] = bool(one["series_uids"] == 1 and one["instance_numbers_monotonic"]
                             and one["source_geometry"] and len(files) == len(src))
    return one

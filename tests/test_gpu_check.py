"""gpu_check.py (make gpu-check): the no-GPU path, and the dense peaks MFU is measured against."""

import pytest
from conftest import assert_one_error_line, cli


def test_no_gpu_says_so_and_exits_0():
    r = cli("gpu_check.py", env={"CUDA_VISIBLE_DEVICES": ""}, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("no GPU: TensorFlow "), r.stdout
    assert "CUDA" in lines[0] and "cuDNN" in lines[0]


def test_bad_flags_one_error_line(tmp_path):
    assert_one_error_line(cli("gpu_check.py", "--steps", "0"), "--steps", code=2)
    assert_one_error_line(cli("gpu_check.py", "--keep", tmp_path), "already exists", code=2)


@pytest.mark.parametrize("name, precision, tf32, tflops", [
    ("NVIDIA H100 80GB HBM3", "bfloat16", True, 989.5),  # the SXM5 part
    ("NVIDIA H100 PCIe", "float16", True, 756.5),
    ("NVIDIA H100 NVL", "float32", False, 60.0),
    ("NVIDIA H200", "float32", True, 494.5),  # TF32 tensor cores for float32
    ("NVIDIA H200 NVL", "bfloat16", True, 835.5),
    ("NVIDIA A100-SXM4-80GB", "float32", False, 19.5),
])
def test_dense_peaks_by_gpu_name(name, precision, tf32, tflops):
    import gpu_check

    peak, which = gpu_check.dense_peak(name, precision, tf32)
    assert peak == tflops * 1e12 and "dense" in which


def test_unknown_gpu_has_no_peak_and_says_so():
    import gpu_check

    assert gpu_check.dense_peak("Tesla K80", "float32", False) == (
        None, "no known peak for 'Tesla K80'")

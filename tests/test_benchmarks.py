"""The scripts ``benchmarks/gpu_check.sh`` runs (and the Label Studio download benchmark), run here at CPU sizes.

A session lent a GPU has minutes of it: a script broken by a change to the engine would spend
them on a traceback. These runs check that each script the check calls still runs to its last
line, and the exactness each one prints (same partitions, identical masks); they time nothing.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "insid3_core" / "weights" / "tiny_dinov3_meta.pth")
pytestmark = pytest.mark.slow


def run_benchmark(script: str, *arguments: str, interpret_triton: bool = False) -> str:
    environment = {**os.environ, "TRITON_INTERPRET": "1" if interpret_triton else "0"}
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *arguments], cwd=ROOT,
                         capture_output=True, text=True, env=environment, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    return run.stdout


def test_gpu_check_runs_only_these_scripts():
    called = set(re.findall(r"benchmarks/(\w+\.py)", (ROOT / "benchmarks" / "gpu_check.sh").read_text()))
    assert called == {"decode.py", "clustering.py", "throughput.py", "memory.py"}


def test_decode_benchmark_prints_a_rate_per_loader():
    printed = run_benchmark("decode.py", "--images", "4", "--workers", "1", "2", "--image-size", "128")
    rates = dict(re.findall(r"^(\w+) images_per_s=([\d.]+)$", printed, re.MULTILINE))
    assert set(rates) == {"loader_1_workers", "loader_2_workers", "torchvision_cpu"}
    assert all(float(rate) > 0 for rate in rates.values())


def test_clustering_benchmark_finds_scipys_partitions_with_torch_and_triton():
    printed = run_benchmark("clustering.py", "--weights", TINY, "--image-size", "256", "--targets", "2",
                            "--batch-size", "2", "--repeats", "1", interpret_triton=True)
    torch_line, triton_line = printed.strip().splitlines()[-2:]
    assert torch_line.startswith("torch_ms_per_target=") and torch_line.endswith("same_partitions=2/2")
    assert triton_line.startswith("triton_ms_per_target=") and triton_line.endswith("same_partitions=2/2")


def test_throughput_benchmark_engine_masks_equal_the_per_pair_masks_in_float32():
    printed = run_benchmark("throughput.py", "--device", "cpu", "--weights", TINY, "--image-size", "256",
                            "--targets", "4", "--shots", "1", "--batch-size", "2")
    assert "(identical 4/4)" in printed
    assert re.search(r"^speedup_vs_per_pair=[\d.]+ backbone_share=[\d.]+ targets_per_s=[\d.]+$",
                     printed, re.MULTILINE)


def test_memory_benchmark_prints_a_row_per_size():
    printed = run_benchmark("memory.py", "--device", "cpu", "--backbone", "vit_small_patch16_dinov3",
                            "--sizes", "256")
    assert re.search(r"^\| 256 \| 256 \| [\d.]+ \| [\d.]+ \| 0\.0 \|$", printed, re.MULTILINE)


def test_labelstudio_fetch_benchmark_prints_both_timings_and_their_ratio():
    printed = run_benchmark("labelstudio_fetch.py", "--tasks", "2", "--latency", "0", "--repeats", "1")
    timings = dict(re.findall(r"^(\w+) seconds=([\d.]+)$", printed, re.MULTILINE))
    assert set(timings) == {"one_after_another", "fetch_all"} and re.search(r"^speedup=[\d.]+$", printed, re.MULTILINE)

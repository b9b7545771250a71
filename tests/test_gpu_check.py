"""tools/gpu_check.py, the one-shot GPU check, on a machine without a GPU."""

import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "tools", "gpu_check.py")


def run(tmp_path, *args):
    return subprocess.run([sys.executable, SCRIPT, "--out", str(tmp_path / "report"), *args],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_says_plainly_that_no_gpu_was_found(tmp_path):
    done = run(tmp_path)
    assert done.returncode == 2
    assert "NO GPU FOUND" in done.stdout
    assert "NO GPU FOUND" in (tmp_path / "report" / "summary.md").read_text()


def test_dry_run_runs_the_parts_on_the_cpu(tmp_path):
    done = run(tmp_path, "--dry-run", "--parts", "cuda-tests,benchmarks,train-mnist_cnn",
               "--data-root", str(tmp_path / "no-data"))
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())
    status = {p["part"]: p["status"] for p in summary["parts"]}
    assert summary["dry_run"] and "DRY RUN" in done.stdout
    assert status["cuda-tests"] == "passed", done.stdout
    assert status["benchmarks"] == "passed", done.stdout
    assert status["train-mnist_cnn"].startswith("skipped (no data")
    assert "sdpa_flash" in summary["environment"] and "cudnn_allow_tf32" in summary["environment"]
    assert done.returncode == 0


def test_a_failing_or_hanging_part_does_not_lose_the_others(tmp_path, monkeypatch):
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    try:
        import gpu_check
    finally:
        sys.path.pop(0)
    monkeypatch.setattr(gpu_check, "parts", lambda args: [
        ("fails", [sys.executable, "-c", "raise SystemExit(3)"], 30, {}),
        ("hangs", [sys.executable, "-c", "import time; time.sleep(60)"], 1, {}),
        ("works", [sys.executable, "-c", "print('fine')"], 30, {}),
    ])
    status = gpu_check.main(["--dry-run", "--out", str(tmp_path / "report")])
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())
    parts = {p["part"]: p for p in summary["parts"]}
    assert status == 1
    assert parts["fails"]["status"] == "FAILED (exit 3)"
    assert parts["hangs"]["status"] == "FAILED (over its 1 s limit)"
    assert parts["works"]["status"] == "passed" and "fine" in parts["works"]["tail"]


def test_gpu_narrowing_keeps_the_tests_that_need_a_gpu():
    # gpu-check narrows the suite with HANDGRAD_TEST_DEVICES=cuda (it once
    # used -k cuda, which silently dropped these); the tests that take no
    # `device` but need a GPU carry the gpu mark and must stay selected.
    files = ["tests/test_conv2d.py", "tests/test_lstm.py", "tests/test_max_pool2d.py"]
    done = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q",
                           "-p", "no:cacheprovider", *files], capture_output=True, text=True,
                          timeout=600, cwd=ROOT, env=dict(os.environ, HANDGRAD_TEST_DEVICES="cuda"))
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    collected = done.stdout.splitlines()
    for f in files:
        assert f + "::test_mixed_devices_raise" in collected, f
    # and nothing runs on the CPU in a narrowed run
    assert not any("[cpu" in line for line in collected)

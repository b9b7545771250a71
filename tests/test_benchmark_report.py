"""benchmarks/report.py: a results JSON of benchmarks/run.py into a Markdown page with charts."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPORT = os.path.join(ROOT, "benchmarks", "report.py")
PNG = b"\x89PNG\r\n\x1a\n"


def row(case, mode, native, mine, memory=None):
    r = {"case": case, "mode": mode, "runs": 9, "native_ms": native, "handgrad_ms": mine,
         "speedup": native / mine, "speedup_p25": native / mine * 0.9,
         "speedup_p75": native / mine * 1.1, "target": None}
    if memory:
        r.update(native_peak_mb=memory[0], handgrad_peak_mb=memory[1])
    return r


RESULTS = {
    "environment": {"cpu": "AMD EPYC", "threads": 2, "torch": "2.14.1"},
    "benchmarks": [
        {"benchmark": "max_pool2d", "rows": [row("(128,64,32,32) k2", "forward", 4.0, 1.0),
                                             row("(128,64,32,32) k2", "fwdbwd", 10.0, 4.0,
                                                 (96.0, 48.0))]},
        {"benchmark": "cross_entropy", "rows": [row("(4096, 32000)", "fwdbwd", 3.0, 1.5,
                                                    (1500.0, 500.0))]},
        {"benchmark": "models", "rows": [row("mnist_cnn", "fwdbwd", 30.0, 20.0)]},
    ],
}


def report(*args):
    return subprocess.run([sys.executable, REPORT, *args], capture_output=True, text=True,
                          timeout=300)


def test_report_writes_markdown_and_charts(tmp_path):
    source = tmp_path / "run-20261207.json"
    source.write_text(json.dumps(RESULTS))
    out = tmp_path / "report"
    proc = report(str(source), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    page = (out / "report.md").read_text()
    assert "- cpu: AMD EPYC" in page
    assert "| max_pool2d | (128,64,32,32) k2 | 2.50x |" in page  # the README's table
    assert "| cross_entropy | (4096, 32000) | 2.00x |" in page
    assert "| (128,64,32,32) k2 | forward | 4.000 | 1.000 | 4.00x [3.60-4.40] |  |" in page
    assert "| (4096, 32000) | fwdbwd | 3.000 | 1.500 | 2.00x [1.80-2.20] | 1500.0 / 500.0 |" in page
    for chart in ("speedup.png", "memory.png", "models.png"):
        assert "](%s)" % chart in page
        with open(out / chart, "rb") as f:
            assert f.read(8) == PNG, chart


def test_report_of_another_mode_and_no_models(tmp_path):
    results = dict(RESULTS, benchmarks=RESULTS["benchmarks"][:1])
    source = tmp_path / "run.json"
    source.write_text(json.dumps(results))
    proc = report(str(source), "--out", str(tmp_path / "r"), "--mode", "forward")
    assert proc.returncode == 0, proc.stderr
    page = (tmp_path / "r" / "report.md").read_text()
    assert "| max_pool2d | (128,64,32,32) k2 | 4.00x |" in page
    assert "models.png" not in page and not (tmp_path / "r" / "models.png").exists()


@pytest.mark.parametrize("content, message", [
    (None, "cannot read"),
    ("{not json", "is not JSON"),
    (json.dumps({"rows": []}), "is not a results file of benchmarks/run.py"),
    (json.dumps({"benchmarks": [{"benchmark": "x", "rows": [{"case": "c"}]}]}),
     "a row of x lacks mode, native_ms, handgrad_ms, speedup"),
    (json.dumps({"benchmarks": [{"benchmark": "x", "rows": []}]}), "holds no fwdbwd rows"),
])
def test_bad_results_give_a_one_line_error(tmp_path, content, message):
    source = tmp_path / "bad.json"
    if content is not None:
        source.write_text(content)
    proc = report(str(source), "--out", str(tmp_path / "r"))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in proc.stderr, proc.stderr

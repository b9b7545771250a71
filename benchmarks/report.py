"""Turns a results file of benchmarks/run.py into a Markdown page with charts.

    python benchmarks/report.py                      # the newest benchmarks/results/run-*.json
    python benchmarks/report.py RESULTS.json [--out DIR] [--mode fwdbwd]

Writes DIR/report.md (default: benchmarks/results/report-<results name>/) and
next to it three charts:

* speedup.png: native time / handgrad time of every case (above 1: handgrad is
  faster), with the 25th-75th percentile spread of the per-run ratios;
* memory.png: the peak memory of one forward+backward, native and handgrad;
* models.png: one training step of each whole model (bench_models.py), if
  the results hold them.

The page lists the machine and versions the results came from, the charts,
one table per op, and the short table the README shows (one line per case,
the chosen mode). Bad input ends with one line on stderr and exit status 2.
"""

import argparse
import glob
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
MODES = ("forward", "backward", "fwdbwd")
MODELS = "models"  # the benchmark name of bench_models.py's whole-model steps


class ReportError(Exception):
    """The results file cannot be turned into a report; the message says why."""


def newest_results(folder):
    found = sorted(glob.glob(os.path.join(folder, "run-*.json")), key=os.path.getmtime)
    if not found:
        raise ReportError("no results in %s: run python benchmarks/run.py first, or name a "
                          "results file" % folder)
    return found[-1]


def load_results(path):
    try:
        with open(path) as f:
            results = json.load(f)
    except OSError as e:
        raise ReportError("cannot read %s: %s" % (path, e.strerror or e)) from None
    except ValueError as e:
        raise ReportError("%s is not JSON: %s" % (path, e)) from None
    blocks = results.get("benchmarks") if isinstance(results, dict) else None
    if not isinstance(blocks, list) or not all(isinstance(b, dict) and "rows" in b for b in blocks):
        raise ReportError("%s is not a results file of benchmarks/run.py (no 'benchmarks' list "
                          "of {'benchmark', 'rows'})" % path)
    for block in blocks:
        for row in block["rows"]:
            missing = [k for k in ("case", "mode", "native_ms", "handgrad_ms", "speedup")
                       if k not in row]
            if missing:
                raise ReportError("%s: a row of %s lacks %s" % (path, block.get("benchmark", "?"),
                                                               ", ".join(missing)))
    return results


def rows_of(results, mode, models):
    """(benchmark, row) pairs of one mode; the whole-model steps or the ops."""
    return [(b["benchmark"], r) for b in results["benchmarks"] for r in b["rows"]
            if r["mode"] == mode and (b["benchmark"] == MODELS) == models]


def _label(benchmark, row):
    return "%s %s" % (benchmark, row["case"]) if benchmark != MODELS else row["case"]


def _speedup_chart(pairs, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [_label(b, r) for b, r in pairs]
    values = [r["speedup"] for _, r in pairs]
    low = [max(0.0, r["speedup"] - r.get("speedup_p25", r["speedup"])) for _, r in pairs]
    high = [max(0.0, r.get("speedup_p75", r["speedup"]) - r["speedup"]) for _, r in pairs]
    fig, ax = plt.subplots(figsize=(8, 0.32 * len(pairs) + 1.2))
    colors = ["tab:green" if v >= 1 else "tab:red" for v in values]
    ax.barh(range(len(pairs)), values, xerr=[low, high], color=colors, capsize=2)
    ax.axvline(1.0, color="black", lw=1)
    ax.set_yticks(range(len(pairs)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("native time / handgrad time (above 1: handgrad is faster; bars: 25th-75th "
                  "percentile)")
    ax.set_title(title)
    ax.grid(axis="x", alpha=0.3)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def _memory_chart(pairs, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [_label(b, r) for b, r in pairs]
    fig, ax = plt.subplots(figsize=(8, 0.36 * len(pairs) + 1.2))
    ys = range(len(pairs))
    ax.barh([y - 0.2 for y in ys], [r["native_peak_mb"] for _, r in pairs], height=0.4,
            label="native", color="tab:gray")
    ax.barh([y + 0.2 for y in ys], [r["handgrad_peak_mb"] for _, r in pairs], height=0.4,
            label="handgrad", color="tab:blue")
    ax.set_yticks(list(ys), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("peak memory of one forward+backward (MB, log scale)")
    ax.legend()
    ax.grid(axis="x", alpha=0.3)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def _spread(row):
    if "speedup_p25" in row and "speedup_p75" in row:
        return "%.2fx [%.2f-%.2f]" % (row["speedup"], row["speedup_p25"], row["speedup_p75"])
    return "%.2fx" % row["speedup"]


def _memory(row):
    if row.get("native_peak_mb") is None or row.get("handgrad_peak_mb") is None:
        return ""
    return "%.1f / %.1f" % (row["native_peak_mb"], row["handgrad_peak_mb"])


def op_tables(results):
    out = []
    for block in results["benchmarks"]:
        out += ["", "### %s" % block["benchmark"], "",
                "| case | mode | native ms | handgrad ms | speedup [p25-p75] | peak MB native / "
                "handgrad |", "|---|---|---|---|---|---|"]
        for row in block["rows"]:
            out.append("| %s | %s | %.3f | %.3f | %s | %s |"
                       % (row["case"], row["mode"], row["native_ms"], row["handgrad_ms"],
                          _spread(row), _memory(row)))
    return out


def readme_table(results, mode):
    out = ["| op | case | speedup |", "|---|---|---|"]
    for block in results["benchmarks"]:
        for row in block["rows"]:
            if row["mode"] == mode:
                out.append("| %s | %s | %.2fx |" % (block["benchmark"], row["case"],
                                                    row["speedup"]))
    return out


def write_report(results, source, out_dir, mode="fwdbwd"):
    """Writes report.md and the charts into out_dir; returns the report's path."""
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        raise ReportError("cannot write to %s: %s" % (out_dir, e.strerror or e)) from None
    ops = rows_of(results, mode, models=False)
    models = rows_of(results, mode, models=True)
    if not ops and not models:
        raise ReportError("%s holds no %s rows (modes present: %s)" % (
            source, mode, ", ".join(sorted({r["mode"] for b in results["benchmarks"]
                                            for r in b["rows"]})) or "none"))
    env = results.get("environment", {})
    lines = ["# handgrad vs native PyTorch: %s" % os.path.basename(source), ""]
    lines += ["- %s: %s" % (k, v) for k, v in env.items()]
    lines += ["", "Speedup = native time / handgrad time, medians of interleaved runs in one "
              "process (above 1: handgrad is faster); brackets: 25th-75th percentile of the "
              "per-run ratios. Mode in the charts: %s." % mode, ""]
    if ops:
        _speedup_chart(ops, os.path.join(out_dir, "speedup.png"), "handgrad ops (%s)" % mode)
        lines += ["## Speedup per case", "", "![speedup per case](speedup.png)", ""]
        with_memory = [(b, r) for b, r in ops if r.get("native_peak_mb") and
                       r.get("handgrad_peak_mb")]
        if with_memory:
            _memory_chart(with_memory, os.path.join(out_dir, "memory.png"))
            lines += ["## Peak memory per case", "", "![peak memory per case](memory.png)", ""]
    if models:
        _speedup_chart(models, os.path.join(out_dir, "models.png"),
                       "one training step of each model (%s)" % mode)
        lines += ["## Model training steps", "", "![model training steps](models.png)", ""]
    lines += ["## Table for the README", ""] + readme_table(results, mode)
    lines += ["", "## Every case"] + op_tables(results)
    path = os.path.join(out_dir, "report.md")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("results", nargs="?", help="a results JSON of benchmarks/run.py "
                        "(default: the newest benchmarks/results/run-*.json)")
    parser.add_argument("--out", help="folder for report.md and the charts")
    parser.add_argument("--mode", default="fwdbwd", choices=MODES,
                        help="the mode charted and tabled for the README (default fwdbwd)")
    args = parser.parse_args(argv)
    try:
        source = args.results or newest_results(os.path.join(HERE, "results"))
        results = load_results(source)
        stem = os.path.splitext(os.path.basename(source))[0]
        out_dir = args.out or os.path.join(HERE, "results", "report-" + stem)
        try:
            path = write_report(results, source, out_dir, args.mode)
        except ImportError:
            raise ReportError("the charts need matplotlib: pip install matplotlib") from None
    except ReportError as e:
        print("report.py: error: %s" % e, file=sys.stderr)
        return 2
    print("wrote %s" % path)
    return 0


if __name__ == "__main__":
    sys.exit(main())

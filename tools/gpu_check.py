"""The one-shot GPU check: everything a person with one GPU should run once.

    python tools/gpu_check.py [--out gpu-report] [--data-root ../shared/data]
    make gpu-check

Runs, each part in its own process with its own time limit, so a failure or a
hang in one part never loses the others:
  environment   GPU, driver, torch/CUDA versions, handgrad.info(), and the
                settings native uses (TF32 for matmul / cuDNN, the SDPA backends)
  cuda-tests    the test suite's CUDA cases (HANDGRAD_TEST_DEVICES=cuda;
                HANDGRAD_REQUIRE_GPU=1 turns a missing GPU into a failure)
  benchmarks    every op against native on the GPU (time and peak memory)
  train-*       one short training run of mnist_cnn and cifar_cnn on the GPU
                (accuracy and epoch time), when the data is there
and writes a report folder: one log per part and summary.md with every
number. The whole check is sized to finish in under 8 minutes.

Without a GPU it says so plainly and exits with status 2. `--dry-run` runs
the same parts, cut down, on the CPU (the CUDA kernels through the CUDA
emulator), to prove the check itself works on a machine without one.
"""

import argparse
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable


def parts(args):
    """(name, command, time limit in seconds, extra environment) of each part."""
    device = "cpu" if args.dry_run else "cuda"
    tests_env = {"HANDGRAD_TEST_DEVICES": "cuda-emulated" if args.dry_run else "cuda"}
    if not args.dry_run:
        tests_env["HANDGRAD_REQUIRE_GPU"] = "1"
    tests = [PY, "-m", "pytest", "tests", "-q", "-p", "no:cacheprovider", "-ra",
             "--junitxml", os.path.join(args.out, "cuda-tests.xml")]
    if args.dry_run:
        tests += ["-k", "test_max_pool2d"]
    bench = [PY, os.path.join("benchmarks", "run.py"), "--device", device,
             "--out", os.path.join(args.out, "benchmarks")]
    bench += (["--only", "max_pool2d", "--reps", "2", "--max-seconds", "1"] if args.dry_run
              else ["--reps", "10", "--max-seconds", "2"])
    out = [
        ("cuda-tests", tests, 240, tests_env),
        ("benchmarks", bench, 200, {}),
    ]
    for model, limit in (("mnist_cnn", 20000), ("cifar_cnn", 20000)):
        train = [PY, "-m", "handgrad", "train", model, "--device", device, "--epochs", "1",
                 "--data-root", args.data_root, "--out", os.path.join(args.out, "runs", model),
                 "--limit", str(256 if args.dry_run else limit)]
        out.append(("train-" + model, train, 120, {}))
    return out


def environment(args):
    import torch

    import handgrad

    facts = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
             "host": platform.node(), "python": platform.python_version()}
    facts.update(handgrad.info())
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        facts.update({
            "gpu": props.name,
            "compute_capability": "%d.%d" % (props.major, props.minor),
            "gpu_memory_GiB": round(props.total_memory / 2**30, 1),
            "sms": props.multi_processor_count,
        })
    facts.update({
        "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
        "cudnn_version": torch.backends.cudnn.version() if torch.backends.cudnn.is_available()
        else None,
        "sdpa_flash": torch.backends.cuda.flash_sdp_enabled(),
        "sdpa_mem_efficient": torch.backends.cuda.mem_efficient_sdp_enabled(),
        "sdpa_math": torch.backends.cuda.math_sdp_enabled(),
    })
    try:
        facts["nvidia_smi"] = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,clocks.max.sm,power.limit",
             "--format=csv,noheader"], capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError) as e:
        facts["nvidia_smi"] = "not available (%s)" % e
    return facts


def run_part(name, command, limit, extra_env, out):
    log_path = os.path.join(out, name + ".log")
    env = dict(os.environ, **extra_env)
    start = time.monotonic()
    with open(log_path, "w") as log:
        log.write("$ %s\n\n" % " ".join(shlex.quote(c) for c in command))
        log.flush()
        try:
            done = subprocess.run(command, cwd=ROOT, env=env, stdout=log,
                                  stderr=subprocess.STDOUT, timeout=limit)
            status = "passed" if done.returncode == 0 else "FAILED (exit %d)" % done.returncode
        except subprocess.TimeoutExpired:
            status = "FAILED (over its %d s limit)" % limit
        except OSError as e:
            status = "FAILED (%s)" % e
    seconds = time.monotonic() - start
    with open(log_path) as log:
        tail = log.read().splitlines()[-25:]
    return {"part": name, "status": status, "seconds": round(seconds, 1), "log": log_path,
            "tail": tail}


def write_summary(out, facts, results, dry_run):
    lines = ["# handgrad GPU check%s" % (" -- DRY RUN on the CPU (no GPU)" if dry_run else ""),
             "", "## Environment", ""]
    lines += ["- %s: %s" % (k, v) for k, v in facts.items()]
    lines += ["", "## Parts", "", "| part | status | seconds |", "|---|---|---|"]
    lines += ["| %s | %s | %s |" % (r["part"], r["status"], r["seconds"]) for r in results]
    for r in results:
        lines += ["", "### %s (%s)" % (r["part"], r["status"]), "", "```"] + r["tail"] + ["```"]
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump({"environment": facts, "parts": results, "dry_run": dry_run}, f, indent=1,
                  default=str)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--out", default="gpu-report", help="report folder (default gpu-report)")
    parser.add_argument("--data-root", default=os.path.join(ROOT, "..", "shared", "data"),
                        help="folder with MNIST/ and cifar10/ for the training runs")
    parser.add_argument("--dry-run", action="store_true",
                        help="no GPU: run cut-down parts on the CPU to test the check itself")
    parser.add_argument("--parts", default=None,
                        help="comma-separated subset of parts to run (default: all)")
    args = parser.parse_args(argv)
    args.out = os.path.abspath(args.out)
    os.makedirs(args.out, exist_ok=True)

    import torch

    if not torch.cuda.is_available() and not args.dry_run:
        message = ("NO GPU FOUND: torch.cuda.is_available() is False (torch %s, CUDA build %s). "
                   "This check needs a CUDA GPU; run it on a GPU machine, or pass --dry-run "
                   "to exercise it on the CPU." % (torch.__version__, torch.version.cuda))
        print(message)
        with open(os.path.join(args.out, "summary.md"), "w") as f:
            f.write("# handgrad GPU check\n\n%s\n" % message)
        return 2
    if args.dry_run:
        print("DRY RUN: no GPU is used; the parts run cut down on the CPU, the CUDA tests "
              "on the CUDA emulator.")

    facts = environment(args)
    print("\n".join("%s: %s" % kv for kv in facts.items()))
    wanted = set(args.parts.split(",")) if args.parts else None
    results = []
    for name, command, limit, extra_env in parts(args):
        if wanted is not None and name not in wanted:
            continue
        if name.startswith("train-") and not os.path.isdir(args.data_root):
            results.append({"part": name, "status": "skipped (no data at %s)" % args.data_root,
                            "seconds": 0, "log": None, "tail": []})
            continue
        print("\n== %s (limit %d s)" % (name, limit), flush=True)
        result = run_part(name, command, limit, extra_env, args.out)
        print("   %s in %.0f s; log: %s" % (result["status"], result["seconds"], result["log"]))
        results.append(result)
    write_summary(args.out, facts, results, args.dry_run)
    print("\nreport: %s" % os.path.join(args.out, "summary.md"))
    return 0 if all(not r["status"].startswith("FAILED") for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())

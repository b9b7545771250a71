#!/usr/bin/env python3
"""Mutation testing of handgrad's Python (ops, nn, training) with mutmut.

    python tools/mutation.py                      # every group, 40 minutes in all
    python tools/mutation.py --groups max_pool2d conv2d --budget-minutes 20
    python tools/mutation.py --report             # print the scores of the last run
    python tools/mutation.py --groups lstm --recheck  # survivors again, with the new tests

mutmut copies the package into mutants/, rewrites every function into a
trampoline that can switch on one mutant at a time, records which tests reach
which function (one traced run of the selected tests), then for each mutant
runs only those tests (with -x) in a forked worker. A mutant is killed when a
test fails, survives when all pass.

Why groups in scratch directories: mutmut only finds mutated code under ./,
src/ or source/ (handgrad's package lives in python/), and one run over the
whole suite would send every mutant of a shared helper through every test
file. So each group (an op's Python files and its test file) gets its own
directory build/mutation/<group>/ with src/handgrad (a copy of
python/handgrad, the built extension included: build it first), tests/ and a
pyproject.toml naming the files to mutate and the tests that judge them.
Tests run on the CPU only (HANDGRAD_TEST_DEVICES=cpu): the Python is the
same for every device, and the emulated CUDA cases would double the time.
The torch.compile tests are left out: dynamo cannot trace mutmut's
trampolines, so they fail for every mutant (opcheck still checks the fake
kernels).
One OpenMP/intra-op thread, so forked workers cannot inherit a thread pool.

The run stops at the budget; mutants not reached are reported as unchecked
(mutmut keeps its results, so a second run with the same group continues).
Surviving mutants are listed in docs/mutation.md with the test that now kills
them or the reason they are equivalent. Code that runs at import (op and
autocast registration: register_autograd, _register_autocast) cannot be
judged: the worker imports handgrad before it switches a mutant on, so its
mutants always "survive"; docs/mutation.md says how they were checked.
"""

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "build" / "mutation"

# group: (files under python/handgrad to mutate, test files, pytest -k filter or None).
# The op groups include test_autograd_transforms.py: the double backward and
# forward-mode formulas (_<op>_autograd.py) are tested there (the first run,
# without it, counted 35 cross_entropy and 3 conv2d mutants of those formulas
# as survivors that that file kills).
TRANSFORMS = "tests/test_autograd_transforms.py"
GROUPS = {
    "max_pool2d": (["ops/max_pool2d.py", "nn/pooling.py"], ["tests/test_max_pool2d.py", TRANSFORMS],
                   "not property and not huge"),
    "conv2d": (["ops/conv2d.py", "nn/conv.py"], ["tests/test_conv2d.py", TRANSFORMS],
               "not property and not huge and not avx512 and not autocast_bfloat16"),
    "cross_entropy": (["ops/cross_entropy.py", "ops/_cross_entropy_autograd.py", "nn/loss.py"],
                      ["tests/test_cross_entropy.py", TRANSFORMS], "not fuzz"),
    "attention": (["ops/attention.py", "ops/_attention_autograd.py", "nn/attention.py"],
                  ["tests/test_attention.py", TRANSFORMS], None),
    "lstm": (["ops/lstm.py", "ops/_lstm_autograd.py", "nn/rnn.py"],
             ["tests/test_lstm.py", "tests/test_lstm_dropout.py", "tests/test_lstm_packed.py",
              "tests/test_lstm_reduced_precision.py", TRANSFORMS], None),
    "autograd": (["ops/_autograd.py", "ops/_args.py", "ops/_autocast.py"],
                 ["tests/test_autocast.py", TRANSFORMS], None),
    # Scripts and torchrun runs (epoch_times.py, the 2-process trainings) are
    # subprocesses, where mutants are never switched on: only in-process tests.
    "training": (["training/*.py"], ["tests/test_train_cli.py", "tests/test_distributed.py"],
                 "not epoch_times and not two_processes and not killed_process"),
}

# Appended to the scratch copy's conftest.py: tests that call torch.compile
# anywhere in their body (not only those named *compile*) are skipped under
# mutmut, whose trampolines dynamo cannot trace.
SKIP_COMPILE_HOOK = """

def pytest_runtest_setup(item):  # added by tools/mutation.py
    import inspect
    try:
        source = inspect.getsource(item.function)
    except (OSError, TypeError, AttributeError):
        return
    if "torch.compile(" in source:
        pytest.skip("torch.compile cannot trace mutmut's trampolines")
"""

STATUS_RE = re.compile(r"^\s*(\S+): (killed|survived|no tests|timeout|suspicious|skipped|"
                       r"segfault|not checked|check was interrupted by user|caught by type check)")


def _toml_list(items):
    return "[" + ", ".join(json.dumps(i) for i in items) + "]"


def prepare(group):
    work = WORK / group
    if (work / "mutants").exists():
        return work  # continue the earlier run: mutmut keeps its results there
    if work.exists():
        shutil.rmtree(work)
    copy_package(group)
    write_tests_and_config(group)
    return work


def copy_package(group):
    """python/handgrad (the built extension included) as the group's source, as it is now."""
    shutil.copytree(ROOT / "python" / "handgrad", WORK / group / "src" / "handgrad",
                    ignore=shutil.ignore_patterns("__pycache__"), dirs_exist_ok=True)


def write_tests_and_config(group):
    """The group's tests and their selection, as they are in the repository now."""
    files, tests, keyword = GROUPS[group]
    work = WORK / group
    shutil.rmtree(work / "tests", ignore_errors=True)
    shutil.copytree(ROOT / "tests", work / "tests", ignore=shutil.ignore_patterns("__pycache__"))
    with open(work / "tests" / "conftest.py", "a") as conftest:
        conftest.write(SKIP_COMPILE_HOOK)
    # torch.compile(fullgraph=True) cannot trace mutmut's trampolines (every
    # compile test fails, mutated or not), so the compile tests sit out.
    keyword = "not compile" + (f" and ({keyword})" if keyword else "")
    selection = list(tests) + ["-k", keyword]
    (work / "pyproject.toml").write_text(
        "[tool.mutmut]\n"
        'source_paths = ["src/handgrad"]\n'
        f"only_mutate = {_toml_list('src/handgrad/' + f for f in files)}\n"
        f"pytest_add_cli_args_test_selection = {_toml_list(selection)}\n"
        'pytest_add_cli_args = ["-p", "no:cacheprovider", "-W", "ignore"]\n'
        'process_isolation = "forkserver"\n'
        "timeout_multiplier = 5.0\n"
        "[tool.pytest.ini_options]\n"
        'testpaths = ["tests"]\n')


def _env():
    env = dict(os.environ)
    # HANDGRAD_TEST_TRAIN_IN_PROCESS: test_train_cli.py trains in the pytest
    # process, where mutants are switched on (not in `handgrad train` subprocesses).
    env.update(HANDGRAD_TEST_DEVICES="cpu", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               PYTHONDONTWRITEBYTECODE="1", HANDGRAD_TEST_TRAIN_IN_PROCESS="1")
    env.pop("PYTHONPATH", None)  # the mutated copy in mutants/src must be the handgrad imported
    return env


def run_group(group, seconds, children, names=()):
    work = prepare(group)
    log = open(work / "mutmut.log", "a")
    # Named mutants are run again even when they have a result.
    cmd = [sys.executable, "-m", "mutmut", "run", "--max-children", str(children), *names]
    proc = subprocess.Popen(cmd, cwd=work, env=_env(), stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        proc.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGINT)  # mutmut saves results as it goes
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode


def results(group):
    work = WORK / group
    if not (work / "mutants").exists():
        return None
    out = subprocess.run([sys.executable, "-m", "mutmut", "results", "--all", "true"], cwd=work,
                         env=_env(), capture_output=True, text=True).stdout
    by_status = {}
    for line in out.splitlines():
        m = STATUS_RE.match(line)
        if m:
            by_status.setdefault(m.group(2), []).append(m.group(1))
    return by_status


def report(groups):
    total_killed = total_checked = 0
    for group in groups:
        by_status = results(group)
        if by_status is None:
            print(f"{group:14s} not run")
            continue
        killed = len(by_status.get("killed", [])) + len(by_status.get("timeout", []))
        survived = by_status.get("survived", [])
        checked = killed + len(survived)
        total_killed += killed
        total_checked += checked
        rest = {k: len(v) for k, v in by_status.items() if k not in ("killed", "survived", "timeout")}
        score = f"{100 * killed / checked:5.1f}%" if checked else "  -  "
        print(f"{group:14s} score {score}  killed {killed}  survived {len(survived)}  {rest}")
        for name in survived:
            print(f"    survived: {name}")
    if total_checked:
        print(f"overall score {100 * total_killed / total_checked:.1f}% "
              f"({total_killed} of {total_checked} checked mutants killed)")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--groups", nargs="+", choices=sorted(GROUPS), default=list(GROUPS))
    parser.add_argument("--budget-minutes", type=float, default=40.0,
                        help="wall-clock budget shared by the groups in order (default 40)")
    parser.add_argument("--children", type=int, default=2, help="mutants run in parallel")
    parser.add_argument("--fresh", action="store_true", help="discard earlier results")
    parser.add_argument("--report", action="store_true", help="only print the last results")
    parser.add_argument("--recheck", action="store_true",
                        help="after writing tests: take the repository's tests and selection "
                             "into the groups' earlier runs and run their survivors and "
                             "untested mutants again")
    args = parser.parse_args()
    if not args.report:
        if not list((ROOT / "python" / "handgrad").glob("_C*.so")):
            sys.exit("build handgrad first (python setup.py build_ext --inplace)")
        if args.fresh:
            for group in args.groups:
                shutil.rmtree(WORK / group, ignore_errors=True)
        deadline = time.monotonic() + 60 * args.budget_minutes
        for i, group in enumerate(args.groups):
            left = deadline - time.monotonic()
            if left <= 0:
                print(f"budget spent before {group}")
                break
            # an even share of what is left, so one slow group cannot starve the rest
            share = left / (len(args.groups) - i)
            names = ()
            if args.recheck:
                earlier = results(group)
                if earlier is None:
                    print(f"{group}: no earlier run to recheck")
                    continue
                names = earlier.get("survived", []) + earlier.get("no tests", [])
                if not names:
                    continue
                # The package as it is now too: a test of this session may need a fix
                # elsewhere in handgrad (mutmut re-mutates only files that changed).
                copy_package(group)
                write_tests_and_config(group)  # mutmut copies them into mutants/ each run
                print(f"{group}: rechecking {len(names)} mutants", flush=True)
            print(f"{group}: up to {share / 60:.1f} min", flush=True)
            run_group(group, share, args.children, names)
    report(args.groups)


if __name__ == "__main__":
    main()

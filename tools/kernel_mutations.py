#!/usr/bin/env python3
"""Targeted one-line mutations of the C++ and CUDA kernels, each run against
the op's CPU or emulated-CUDA tests: does the suite notice the bug?

    python tools/kernel_mutations.py                 # every mutation
    python tools/kernel_mutations.py --only K1 K9    # some of them
    python tools/kernel_mutations.py --list

Each mutation is a plausible slip of the kind the kernels are most exposed
to: a tail or tile bound off by one, a block boundary, a dropped gradient
term, a swapped stride, an off-by-one in a reduction split. For each, the
script writes the mutated line into a scratch git worktree (default
/tmp/handgrad-kernel-mutations, at this checkout's HEAD), rebuilds it
incrementally (HANDGRAD_CUDA=0 HANDGRAD_CUDA_EMULATION=1, ccache when
/usr/lib/ccache exists), runs the named tests of this checkout with -x (CPU mutations on the
"cpu" device, CUDA mutations on "cuda-emulated": the .cu kernels compiled for
the host), records killed (a test failed or crashed) or survived, and
restores the file. A mutation whose build fails is reported as such (it says
nothing about the tests). The kill rate and each result go to stdout and to
build/kernel_mutations.json. Results are recorded in docs/mutation.md.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Mutation:
    name: str
    file: str        # under csrc/ops
    old: str         # exact text, replaced at its first occurrence
    new: str
    device: str      # "cpu" or "cuda-emulated": whose kernels the mutation is in
    tests: tuple     # pytest arguments
    why: str


MUTATIONS = [
    Mutation("K1", "cpu/max_pool2d.cpp",
             "const int64_t blocks = (C + kBlock - 1) / kBlock;",
             "const int64_t blocks = (C + kBlock - 2) / kBlock;",
             "cpu", ("tests/test_max_pool2d.py",),
             "channels_last backward: the channel-block count drops a tail of one channel"),
    Mutation("K2", "cpu/attention.cpp",
             "j = std::max<int64_t>(0, c.q0 + i - c.k0 + 1)",
             "j = std::max<int64_t>(0, c.q0 + i - c.k0 + 2)",
             "cpu", ("tests/test_attention.py", "-k", "causal"),
             "causal mask lets each query see one future key"),
    Mutation("K3", "cpu/attention.cpp",
             "c.nk = std::min(kBlockK, k_end - k0);",
             "c.nk = std::min(kBlockK - 1, k_end - k0);",
             "cpu", ("tests/test_attention.py",),
             "forward key tile boundary: the last key of every full 512-key tile is skipped"),
    Mutation("K4", "cpu/lstm_rows.inc",
             "V(fnmadd_ps)(tc, tc, one), load_or_zero(pc, j));",
             "V(fnmadd_ps)(tc, tc, one), V(setzero_ps)());",
             "cpu", ("tests/test_lstm.py",),
             "vectorised LSTM backward drops the incoming cell-state gradient dc"),
    Mutation("K5", "cpu/conv2d_gemm.cpp",
             "cols = chunk.columns(), sh = g.h.stride, sw = g.w.stride;",
             "cols = chunk.columns(), sh = g.w.stride, sw = g.h.stride;",
             "cpu", ("tests/test_conv2d.py",),
             "im2col reads with the h and w strides swapped"),
    Mutation("K6", "cpu/cross_entropy.cpp",
             "const A keep = A(1) - static_cast<A>(p.smoothing);",
             "const A keep = A(1);",
             "cpu", ("tests/test_cross_entropy.py",),
             "target gradient of probability targets ignores label smoothing"),
    Mutation("K7", "cuda/max_pool2d.cu",
             "if (idx[o] == me && window_reads_input(g.h, oh) && window_reads_input(g.w, ow)) {",
             "if (idx[o] == me && window_reads_input(g.h, oh)) {",
             "cuda-emulated", ("tests/test_max_pool2d.py",),
             "backward sends gradient from windows of only padding along w"),
    Mutation("K8", "cuda/lstm.cu",
             "for (int64_t r = 0; r < R; ++r) acc += static_cast<acc_t>(m[r * C + col]);",
             "for (int64_t r = 1; r < R; ++r) acc += static_cast<acc_t>(m[r * C + col]);",
             "cuda-emulated", ("tests/test_lstm.py",),
             "bias gradient column sum skips the first row"),
    Mutation("K9", "cuda/conv2d.cu",
             "end = begin + split_len < K ? begin + split_len : K;",
             "end = begin + split_len - 1 < K ? begin + split_len - 1 : K;",
             "cuda-emulated", ("tests/test_conv2d.py", "tests/test_conv2d_cuda_paths.py"),
             "weight-gradient split: each split but the last loses its final element"),
    Mutation("K10", "cuda/conv2d.cu",
             "const int64_t split_len = (reduction + splits - 1) / splits;",
             "const int64_t split_len = reduction / splits;",
             "cuda-emulated", ("tests/test_conv2d.py", "tests/test_conv2d_cuda_paths.py"),
             "weight-gradient split length rounds down: the reduction's tail is dropped"),
    Mutation("K11", "cuda/attention.cu",
             "ds[jj] = prob * ((dp[jj] + dw) *",
             "ds[jj] = prob * ((dp[jj]) *",
             "cuda-emulated", ("tests/test_attention.py", "tests/test_attention_cuda_paths.py"),
             "backward drops the gradient arriving through the returned weights"),
    Mutation("K12", "cuda/cross_entropy.cu",
             "for (int i = 1; i < G / 32; ++i) v = op(v, shm[i]);",
             "for (int i = 1; i < G / 32 - 1; ++i) v = op(v, shm[i]);",
             "cuda-emulated", ("tests/test_cross_entropy.py",),
             "block reduction over warps forgets the last warp's partial"),
    Mutation("K13", "cuda/conv2d.cu",
             "PixelGrid{g.h.out_size, g.w.out_size}.split(n, image, oh, ow);",
             "PixelGrid{g.w.out_size, g.h.out_size}.split(n, image, oh, ow);",
             "cuda-emulated", ("tests/test_conv2d.py", "tests/test_conv2d_cuda_paths.py"),
             "output pixel index split with height and width swapped"),
]


def sh(cmd, cwd, env=None, log=None, timeout=None):
    return subprocess.run(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT,
                          timeout=timeout).returncode


def build_env(tree):
    env = dict(os.environ, HANDGRAD_CUDA="0", HANDGRAD_CUDA_EMULATION="1",
               MAX_JOBS=os.environ.get("MAX_JOBS", "1"))
    if Path("/usr/lib/ccache").is_dir():
        env.update(PATH="/usr/lib/ccache:" + env["PATH"], CCACHE_BASEDIR=str(tree),
                   CCACHE_NOHASHDIR="1")
    return env


def prepare_tree(tree):
    if not tree.exists():
        subprocess.run(["git", "worktree", "add", "--detach", str(tree), "HEAD"], cwd=ROOT,
                       check=True)
    return tree


def build(tree, log):
    return sh([sys.executable, "setup.py", "build_ext", "--inplace"], tree, build_env(tree), log)


def run_tests(tree, m, log, timeout):
    # The scratch tree's build (mutated kernels) judged by this checkout's
    # tests, so that a test added for a survivor counts without a commit.
    env = dict(os.environ, PYTHONPATH=str(tree / "python"), HANDGRAD_TEST_DEVICES=m.device)
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *m.tests]
    try:
        return sh(cmd, ROOT, env, log, timeout)
    except subprocess.TimeoutExpired:
        return "timeout"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", help="mutation names (K1 ...)")
    parser.add_argument("--list", action="store_true")
    parser.add_argument("--tree", type=Path, default=Path("/tmp/handgrad-kernel-mutations"))
    parser.add_argument("--test-timeout", type=float, default=1800)
    args = parser.parse_args()
    chosen = [m for m in MUTATIONS if not args.only or m.name in args.only]
    if args.list:
        for m in chosen:
            print(f"{m.name:4s} {m.file:22s} {m.device:14s} {m.why}")
        return
    tree = prepare_tree(args.tree)
    logdir = ROOT / "build" / "kernel_mutations"
    logdir.mkdir(parents=True, exist_ok=True)
    with open(logdir / "baseline.log", "w") as log:
        if build(tree, log) != 0:
            sys.exit(f"the unmutated scratch tree does not build: see {logdir / 'baseline.log'}")
    results = {}
    for m in chosen:
        path = tree / "csrc" / "ops" / m.file
        original = path.read_text()
        if m.old not in original:
            sys.exit(f"{m.name}: {m.old!r} is not in {m.file} (the code moved: update the mutation)")
        start = time.monotonic()
        with open(logdir / f"{m.name}.log", "w") as log:
            try:
                path.write_text(original.replace(m.old, m.new, 1))
                if build(tree, log) != 0:
                    verdict = "build failed"
                else:
                    code = run_tests(tree, m, log, args.test_timeout)
                    verdict = "survived" if code == 0 else "killed"
                    if code == 5:
                        verdict = "no tests"
            finally:
                path.write_text(original)
        results[m.name] = dict(file=m.file, why=m.why, verdict=verdict,
                               seconds=round(time.monotonic() - start))
        print(f"{m.name:4s} {verdict:12s} {m.file:22s} {m.why}", flush=True)
    with open(logdir / "baseline.log", "a") as log:
        build(tree, log)  # leave the scratch tree built unmutated
    judged = [r for r in results.values() if r["verdict"] in ("killed", "survived")]
    killed = sum(r["verdict"] == "killed" for r in judged)
    if judged:
        print(f"kill rate {killed}/{len(judged)} = {100 * killed / len(judged):.0f}%")
    (ROOT / "build" / "kernel_mutations.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()

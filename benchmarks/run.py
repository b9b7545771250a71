"""Runs every op's benchmark (benchmarks/bench_*.py) against native PyTorch.

    python benchmarks/run.py [--threads 2] [--reps 30] [--device cuda] [--only conv2d]

Prints one table per op and saves all results in one JSON + CSV file under
benchmarks/results/ with the machine, versions, git commit and command line.
"""

import glob
import importlib
import os
import sys

import harness

HERE = os.path.dirname(os.path.abspath(__file__))


def discover():
    names = sorted(os.path.basename(p)[len("bench_"):-len(".py")]
                   for p in glob.glob(os.path.join(HERE, "bench_*.py")))
    return {name: importlib.import_module("bench_" + name) for name in names}


def main():
    parser = harness.argument_parser(__doc__.strip().splitlines()[0])
    parser.add_argument("--only", default=None, help="comma-separated op names to run")
    args = parser.parse_args()
    device, modes = harness.configure(args)
    benches = discover()
    if args.only:
        wanted = [n.strip() for n in args.only.split(",")]
        missing = [n for n in wanted if n not in benches]
        if missing:
            raise SystemExit("--only: no benchmark named %s (have: %s)"
                             % (", ".join(missing), ", ".join(benches)))
        benches = {n: benches[n] for n in wanted}
    print("# handgrad vs native PyTorch\n")
    for key, value in harness.environment(device).items():
        print("- %s: %s" % (key, value))
    blocks = [harness.run_benchmark(name, module.make_cases, args, device, modes)
              for name, module in benches.items()]
    results = {"environment": harness.environment(device), "benchmarks": blocks}
    if not args.no_save:
        print("\nsaved %s.{json,csv}" % harness.save(results, args.out, "run"))
    return harness.exit_status([r for b in blocks for r in b["rows"]], args.strict)


if __name__ == "__main__":
    sys.exit(main())

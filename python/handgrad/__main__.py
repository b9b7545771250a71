"""Command line: ``handgrad info``, ``handgrad train MODEL`` and ``handgrad compare RUN...``
(also ``python -m handgrad``)."""

import os
import sys

TRAIN_EXTRA = "pip install handgrad[train]"


def _version_line():
    import handgrad
    from . import _compat

    built = " for torch %s" % _compat.build.torch_version if _compat.build is not None else ""
    return "handgrad %s (built%s)" % (handgrad.__version__, built)


def _parser():
    from .training.cli import OneLineErrors, add_compare_arguments, add_train_arguments

    parser = OneLineErrors(prog="handgrad", description=__doc__)
    parser.add_argument("--version", action="version", version=_version_line())
    commands = parser.add_subparsers(dest="command", metavar="COMMAND",
                                     parser_class=OneLineErrors)
    commands.add_parser("info", help="show how handgrad was built and what it can use now")
    add_train_arguments(commands.add_parser("train", help="train one of handgrad's models",
                                            description="Train a model on handgrad's ops "
                                                        "(or natively, to compare); under "
                                                        "torchrun, data-parallel on several "
                                                        "processes (see docs/training.md)."))
    add_compare_arguments(commands.add_parser(
        "compare", help="plot one quantity of several training runs on one plot"))
    return parser


def _fail(command, message, status=2):
    print("handgrad %s: error: %s" % (command, message), file=sys.stderr)
    return status


def _run(argv):
    import handgrad

    args = _parser().parse_args(argv)
    if args.command == "info":
        from ._info import format_info

        print(format_info())
        return 0
    if args.command is None:
        _parser().print_help()
        return 2
    problem = getattr(handgrad, "_load_problem", None)
    if problem is not None:
        return _fail(args.command, problem)
    try:
        from .training import cli, trainer  # noqa: F401  (trainer: tqdm and matplotlib)
    except ImportError as e:  # tqdm, matplotlib or torchvision: the [train] extra
        return _fail(args.command, "%s needs the optional package %s: %s"
                     % (args.command, e.name or e, TRAIN_EXTRA))
    return cli.run(args) if args.command == "train" else cli.compare(args)


def main(argv=None):
    try:
        return _run(argv)
    except BrokenPipeError:
        # The reader went away (`handgrad info | head -2`): stop quietly. Point stdout
        # at /dev/null so that the interpreter's final flush does not fail again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())

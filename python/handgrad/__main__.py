"""Command line: ``handgrad info``, ``handgrad train MODEL`` and ``handgrad compare RUN...``
(also ``python -m handgrad``)."""

import sys


def main(argv=None):
    from .training.cli import OneLineErrors, add_arguments, add_compare_arguments

    parser = OneLineErrors(prog="handgrad", description=__doc__)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND",
                                     parser_class=OneLineErrors)
    commands.add_parser("info", help="show how handgrad was built and what it can use now")
    add_arguments(commands.add_parser("train", help="train one of handgrad's models",
                                      description="Train a model on handgrad's ops "
                                                  "(or natively, to compare)."))
    add_compare_arguments(commands.add_parser(
        "compare", help="plot one quantity of several training runs on one plot"))
    args = parser.parse_args(argv)
    if args.command == "info":
        from ._info import format_info

        print(format_info())
        return 0
    if args.command == "train":
        from .training.cli import run

        return run(args)
    if args.command == "compare":
        from .training.cli import compare

        return compare(args)
    parser.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())

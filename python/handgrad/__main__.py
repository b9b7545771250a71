"""Command line: ``handgrad info`` (also ``python -m handgrad info``)."""

import argparse
import sys


def main(argv=None):
    parser = argparse.ArgumentParser(prog="handgrad", description=__doc__)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.add_parser("info", help="show how handgrad was built and what it can use now")
    args = parser.parse_args(argv)
    if args.command == "info":
        from ._info import format_info

        print(format_info())
        return 0
    parser.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())

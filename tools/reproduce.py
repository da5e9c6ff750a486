"""Thin wrapper: `python tools/reproduce.py [--quick] [--out docs]` == `moe-export reproduce ...`."""

import sys

from moe_export.commands.reproduce import command

if __name__ == "__main__":
    sys.exit(command(prog_name="moe-export reproduce"))

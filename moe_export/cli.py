"""The ``moe-export`` command line.

Subcommands are imported only when they run, so ``moe-export --help`` stays fast and a broken
optional dependency of one subcommand does not take down the others.
"""

from __future__ import annotations

import errno
import importlib

import click

# name -> module in moe_export.commands that defines a click command called `command`
SUBCOMMANDS = {
    "zoo": "Build and train the small MoE models of the built-in zoo.",
    "eval": "Bits per byte and downstream accuracy of a model or exported artifact.",
    "plan": "Per-expert bit plan (router-norm change + MaxVar, or a baseline).",
    "quantize": "Quantize a model with a bit plan into a packed checkpoint.",
    "export": "Export a quantized checkpoint to ExecuTorch (.pte) and ONNX.",
    "bench": "Speed, memory and size of every runtime against float.",
    "demo": "Run the whole pipeline on the built-in tiny model.",
    "run": "Run a shipped recipe (moe_export/recipes/) or a recipe file.",
    "reproduce": "Regenerate docs/results.md (the paper's claims on models trained here).",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return list(SUBCOMMANDS)

    def invoke(self, ctx):
        # A full disk or a read-only output is the user's to fix: one line (moe_export.io names the file), exit 1.
        try:
            return super().invoke(ctx)
        except OSError as err:
            if err.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM):
                raise
            msg = err.strerror or str(err)
            if err.filename and str(err.filename) not in msg:
                msg = f"{err.filename}: {msg}"
            raise click.ClickException(msg) from None

    def get_command(self, ctx, name):
        if name not in SUBCOMMANDS:
            return None
        try:
            module = importlib.import_module(f"moe_export.commands.{name}")
        except ModuleNotFoundError as err:
            if err.name != f"moe_export.commands.{name}":
                raise
            return _not_available(name)
        return module.command

    def format_commands(self, ctx, formatter):
        # Short help comes from the table above so that --help imports nothing heavy.
        with formatter.section("Commands"):
            formatter.write_dl([(name, text) for name, text in SUBCOMMANDS.items()])


def _not_available(name):
    @click.command(name=name, help=SUBCOMMANDS[name] + " (not available in this build)")
    def command():
        raise click.ClickException(f"'moe-export {name}' is not available in this build")

    return command


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="moe-export")
def main():
    """Per-expert mixed-precision quantization and export of Mixture-of-Experts models."""
    _quiet_library_warnings()


def _quiet_library_warnings():
    # Import-time notices from the stack that say nothing about the user's run: torchao's optional CUDA
    # extensions on a CPU build, a pytree deprecation inside torchao, onnx's optional torchvision ops.
    import logging

    for name in ("torchao", "torch.utils._pytree", "torch.onnx._internal.exporter._registration"):
        logging.getLogger(name).setLevel(logging.ERROR)


if __name__ == "__main__":
    main()

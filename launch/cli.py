"""The `tributary` command: `tributary X ARGS...` runs the same `main(ARGS)` as
`python -m launch.X ARGS...`, so its flags, overrides and exit codes are that module's."""

from __future__ import annotations

import importlib
import sys

# subcommand -> (the module whose main(argv) it runs, a line for the listing). A module is
# imported only when its command is chosen, so `tributary --help` needs no torch.
COMMANDS = {
    "train": ("launch.train", "train a recipe, in this one process"),
    "shards": ("launch.make_shards", "build the embedded datasets, turn your data into shards, index, verify"),
    "doctor": ("launch.doctor", "check a recipe against the planned launch before it queues"),
    "submit": ("launch.submit", "render a slurm/*.sbatch template for a recipe and sbatch it"),
    "export": ("launch.export", "export a run's weights as safetensors plus its config"),
    "generate": ("launch.generate", "continue a prompt with a trained language model"),
    "report": ("launch.report", "print the final metrics of finished runs side by side"),
}

# the subcommand being run, so its --help and usage errors name `tributary X`, not `python -m`
_running: str | None = None


def program(module: str) -> str:
    """The name a module's argparse shows: `tributary X` under this command, else `python -m module`."""
    if _running is not None and COMMANDS[_running][0] == module:
        return f"tributary {_running}"
    return f"python -m {module}"


SEVERAL_PROCESSES = """\
`tributary train` is one process. For several, a launcher starts the module itself, with the
same arguments after `-m launch.train`:

    accelerate launch --multi_gpu --num_processes 8 -m launch.train --config ... run.dir=...
    torchrun --nproc_per_node 8 -m launch.train --config ... run.dir=...
"""


def usage() -> str:
    width = max(map(len, COMMANDS))
    module_width = max(len(module) for module, _ in COMMANDS.values())
    rows = "\n".join(
        f"  {name:<{width}}  {module:<{module_width}}  {about}" for name, (module, about) in COMMANDS.items()
    )
    return (
        f"usage: tributary COMMAND [ARGS...]\n\n"
        f"commands (each the same as `python -m MODULE`):\n{rows}\n\n"
        f"`tributary COMMAND --help` lists a command's own arguments.\n\n{SEVERAL_PROCESSES}"
    )


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(), end="", file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"tributary: unknown command {name!r}; choose from {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    global _running
    _running = name
    try:
        return importlib.import_module(COMMANDS[name][0]).main(rest)
    finally:
        _running = None


if __name__ == "__main__":
    # `python -m launch.cli`: run the importable module's main, whose _running the commands read
    from launch.cli import main as cli_main

    sys.exit(cli_main())

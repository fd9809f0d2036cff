"""The ``refvllm`` command: one subcommand per module, each owning its own argument parser.

Every subcommand is ``main(argv: list[str]) -> int``. A :class:`~refvllm.errors.RefvllmError` (bad data,
config or path: the user's to fix) is printed as one line without a traceback and exits 1; argparse usage
errors exit 2.
"""

from __future__ import annotations

import importlib
import sys

from refvllm.errors import RefvllmError

COMMANDS = {
    "validate": ("refvllm.data.validate", "check every sample of a data file (media, masks, conversation)"),
    "synth": ("refvllm.data.synthetic", "write the synthetic referring data set (real media + masks)"),
    "show": ("refvllm.data.show", "render a sample's planned frames with masks and its conversation"),
    "tiny-model": ("refvllm.model.tiny", "write tiny offline HF checkpoints (vision, LLM, tokenizer)"),
    "train": ("refvllm.train.loop", "train (same as scripts/train.py)"),
    "export": ("refvllm.export", "export a checkpoint: PEFT adapter, extra weights, tokenizer, config"),
    "eval": ("refvllm.eval.run", "evaluate a checkpoint or export on a data file"),
    "infer": ("refvllm.infer", "ask a question about objects in a video or image"),
    "region-check": ("refvllm.eval.claim", "check an eval against its --ablate-regions twin (region types)"),
    "smoke": ("refvllm.smoke", "check a config's code paths on random real-shaped checkpoints (reduced depth)"),
}


def _usage() -> str:
    lines = ["usage: refvllm COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<13} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "run 'refvllm COMMAND --help' for a command's options"]
    return "\n".join(lines)


def run_command(module_name: str, argv: list[str]) -> int:
    """Run ``module.main(argv)``, turning user errors into a one-line message and exit code 1."""
    try:
        return int(importlib.import_module(module_name).main(argv) or 0)
    except RefvllmError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    for stream in (sys.stdout, sys.stderr):  # data may hold text the terminal's encoding cannot show
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    if argv[0] not in COMMANDS:
        print(f"error: unknown command '{argv[0]}'\n\n{_usage()}", file=sys.stderr)
        return 2
    return run_command(COMMANDS[argv[0]][0], argv[1:])

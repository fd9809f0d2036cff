#!/usr/bin/env python
"""Evaluate a checkpoint or export: ``python scripts/eval.py --model DIR --data FILE --out METRICS.json ...``.

Same as ``refvllm eval``; see docs/evaluation.md.
"""

import sys

from refvllm.cli import run_command

if __name__ == "__main__":
    sys.exit(run_command("refvllm.eval.run", sys.argv[1:]))

#!/usr/bin/env python
"""Export a training checkpoint: ``python scripts/export.py --checkpoint DIR --out OUT [--merge]``.

Same as ``refvllm export``; see docs/export.md.
"""

import sys

from refvllm.cli import run_command

if __name__ == "__main__":
    sys.exit(run_command("refvllm.export", sys.argv[1:]))

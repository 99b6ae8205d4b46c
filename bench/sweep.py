"""Sweep benchmark: `python bench/sweep.py [--json OUT]` is `python -m qlab bench sweep`."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qlab.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["bench", "sweep", *sys.argv[1:]]))

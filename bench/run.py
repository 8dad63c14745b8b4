"""Run the load harness from a checkout: `python bench/run.py --help`.

The same as `persister bench`; see bench/README.md for what it measures.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Runnable as a plain script from any folder of a checkout.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from persister.bench.harness import main

if __name__ == "__main__":
    sys.exit(main())

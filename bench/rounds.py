"""Run the load harness several times, variants alternated: `python bench/rounds.py --help`.

See persister/bench/rounds.py and bench/README.md ("Comparing runs").
"""

from __future__ import annotations

import sys
from pathlib import Path

# Runnable as a plain script from any folder of a checkout.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from persister.bench.rounds import main

if __name__ == "__main__":
    sys.exit(main())

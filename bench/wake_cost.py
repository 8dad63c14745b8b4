"""What a wake-up costs on this machine: `python bench/wake_cost.py`.

See persister/bench/wake_cost.py and bench/README.md (tenth session).
"""

from __future__ import annotations

import sys
from pathlib import Path

# Runnable as a plain script from any folder of a checkout.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from persister.bench.wake_cost import main

if __name__ == "__main__":
    sys.exit(main())

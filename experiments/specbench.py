"""SpecBench method ladder (ar, sd_ar, sd_ss, mirror_ar, mirror_ss): a thin wrapper around
`mirror-jax bench` (mirror_jax.bench.cli); same arguments.

    python experiments/specbench.py --limit-per-category 1 --max-new-tokens 64
    python experiments/specbench.py --tiny --categories qa translation --max-new-tokens 8
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from mirror_jax.bench.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())

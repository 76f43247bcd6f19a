"""CPU benchmark of LLA vs torch SDPA: a thin wrapper around ``lla bench`` (``lla.bench.main``).

    python benchmarks/bench_cpu.py --quick            # the targets grid (<= ~10 min), targets summary
    python benchmarks/bench_cpu.py --T 1024 2048 --D 64 --ridge 1 --modes fwd --providers lla-auto sdpa
    python benchmarks/bench_cpu.py --help

Writes bench.json, bench.md and bench.png under --out (default benchmarks/results).
"""

import sys

from lla.bench import main

if __name__ == "__main__":
    sys.exit(main())

"""``python -m lla ...`` (and ``torchrun --nproc_per_node=N -m lla run ...``)."""

import sys

from lla.cli import main

sys.exit(main())

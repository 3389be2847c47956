"""``python -m bench``: run the benchmark suite (see bench/README.md)."""

import sys

from .suite import main

sys.exit(main())

"""``python -m benchmarks.uprobe_overhead [--quick]``."""

import sys

from .run import main

sys.exit(main())

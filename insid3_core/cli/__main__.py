"""``python -m insid3_core.cli``: the ``insid3`` command without the console script."""

import sys

from . import main

sys.exit(main())

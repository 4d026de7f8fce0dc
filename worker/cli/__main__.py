"""``python -m worker.cli``: the same as ``apsis-export``."""

import sys

from worker.cli.commands import main

sys.exit(main())

"""``python -m cmrkit``: the same command as ``cmrkit``."""

import sys

from cmrkit.cli import main

sys.exit(main())

"""``python -m normkit``: the ``normkit`` command line."""

import sys

from .cli import main

sys.exit(main())

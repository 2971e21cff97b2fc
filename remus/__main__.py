"""``python -m remus``: the ``remus`` command, for hosts where its script is not on PATH."""

import sys

from remus.cli import main

sys.exit(main())

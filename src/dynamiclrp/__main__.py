"""``python -m dynamiclrp``: the command line (:mod:`dynamiclrp.cli`)."""

import sys

from .cli import main

sys.exit(main())

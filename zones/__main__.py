"""`python -m zones`: see zones/cli.py."""

import sys

from zones.cli import main

sys.exit(main())

"""`python -m toolkit.explain`: see toolkit.explain.cli."""

import sys

from toolkit.explain.cli import main

sys.exit(main())

"""``python -m quantmill.cli``: the ``quantmill`` command."""

import sys

from quantmill.cli import main

sys.exit(main())

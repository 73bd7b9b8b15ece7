"""``python -m patchad.cli``: the ``patchad`` command."""

import sys

from patchad.cli import main

sys.exit(main())

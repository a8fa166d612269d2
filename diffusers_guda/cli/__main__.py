"""``python -m diffusers_guda.cli``: the ``guda`` command."""

import sys

from . import main

sys.exit(main())

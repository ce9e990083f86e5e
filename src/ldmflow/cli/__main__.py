"""``python -m ldmflow.cli``: the ``ldmflow`` command (torchrun and the tests start it this way)."""

import sys

from ldmflow.cli import main

sys.exit(main())

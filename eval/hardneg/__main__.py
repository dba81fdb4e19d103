"""``python -m hardneg`` (and ``torchrun -m hardneg train ...``) is the ``hardneg`` command."""

import sys

from hardneg.cli import main

sys.exit(main())

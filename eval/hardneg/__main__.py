"""``python -m hardneg`` (and ``torchrun -m hardneg train ...``) is the ``hardneg`` command."""

import sys

from eval.cli import main

sys.exit(main())

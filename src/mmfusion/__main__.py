"""``python -m mmfusion`` (and ``torchrun ... -m mmfusion train ...``) runs the command line."""

import sys

from .cli.main import main

sys.exit(main())

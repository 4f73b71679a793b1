"""``python -m diffrep.cli ...`` (used under torchrun): the same as the ``diffrep`` console script."""
import sys

from . import main

sys.exit(main())

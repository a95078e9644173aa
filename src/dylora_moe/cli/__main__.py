"""``python -m dylora_moe.cli ...``: the ``dylora-moe`` command (used by ``torchrun`` and ``accelerate launch``)."""

import sys

from . import main

sys.exit(main())

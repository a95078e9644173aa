"""``python -m dylora_moe.study unit STUDY_CONFIG_JSON VARIANT SEED``: one unit (what ``parallel`` runs)."""

import sys

from .runner import _unit_main

sys.exit(_unit_main(sys.argv[1:]))

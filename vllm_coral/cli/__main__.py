"""``python -m vllm_coral.cli`` (what ``torchrun ... -m vllm_coral.cli train ...`` runs)."""

import sys

from vllm_coral.cli import main

sys.exit(main())

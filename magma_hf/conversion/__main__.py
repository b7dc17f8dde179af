"""`python -m magma_hf.conversion ...`: the converter's command line, the same as `magma-hf convert ...`."""

import sys

from .magma_checkpoint import main

sys.exit(main())

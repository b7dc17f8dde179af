"""Convert the released MAGMA checkpoint into a safetensors model folder.

    python conversion/convert_magma_checkpoint.py --checkpoint Aleph-Alpha/magma-research --output magma-v1

The same as `magma-hf convert ...`; the logic lives in `magma_hf.conversion.magma_checkpoint` (see `--help`).
"""

import sys
from pathlib import Path

try:
    import magma_hf  # noqa: F401
except ImportError:  # run from a checkout without installing the package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from magma_hf.conversion.magma_checkpoint import main

if __name__ == "__main__":
    sys.exit(main())

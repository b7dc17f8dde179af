"""`python -m magma_hf.convert_magma_checkpoint ...`: the converter's command line (the same as `magma-hf convert`).

The converter itself is `magma_hf.convert_magma_checkpoint`, the function (`from magma_hf import
convert_magma_checkpoint`); its code lives in `magma_hf.conversion`.
"""

import sys

if __name__ != "__main__":
    # Imported, this module would replace the function `magma_hf.convert_magma_checkpoint` of the same name.
    raise ImportError(
        "magma_hf.convert_magma_checkpoint is the converter's command line (python -m "
        "magma_hf.convert_magma_checkpoint); import the function with `from magma_hf import convert_magma_checkpoint`"
    )

from magma_hf.conversion.magma_checkpoint import main  # noqa: E402

sys.exit(main())

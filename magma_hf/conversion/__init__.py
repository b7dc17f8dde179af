"""Converting the released MAGMA checkpoint (`mp_rank_00_model_states.pt`) into a safetensors model folder.

`magma_checkpoint` holds MAGMA's side: the original key tables, the accounting of every tensor, the output folder's
bookkeeping and the command line (`magma-hf convert`, `python -m magma_hf.convert_magma_checkpoint`).
`safetensors_writer` knows nothing of MAGMA: tensors by name (slices of a memory-mapped file, or tensors) streamed into
sharded safetensors files + index, each shard fsynced and read back through a check while the next one is written.
"""

from .magma_checkpoint import ConversionReport, MagmaConversionError, convert_magma_checkpoint

__all__ = ["ConversionReport", "MagmaConversionError", "convert_magma_checkpoint"]

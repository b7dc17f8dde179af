"""Converting the released MAGMA checkpoint (`mp_rank_00_model_states.pt`) into a safetensors model folder.

One job a module: `checkpoint` finds, downloads and safely loads the original file; `plan` holds the original key
tables and the accounting of every tensor; `weights` writes the weights and checks what was written; `magma_checkpoint`
holds the conversion (`convert_magma_checkpoint`), the rest of the folder it writes, its bookkeeping and the command
line (`magma-hf convert`, `python -m magma_hf.conversion`). `safetensors_writer` knows nothing of MAGMA: tensors by
name (slices of a memory-mapped file, or tensors) streamed into sharded safetensors files + index, each shard fsynced
and read back through a check while the next one is written.
"""

from .magma_checkpoint import ConversionReport, MagmaConversionError, convert_magma_checkpoint

__all__ = ["ConversionReport", "MagmaConversionError", "convert_magma_checkpoint"]

"""The one object the engine hands the model runner for a forward pass."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ForwardBatch:
    """A flattened, variable-length batch: every scheduled sequence's new tokens back to back.

    Sequence i owns rows cu_query_lens[i]:cu_query_lens[i+1] of the token tensors. Its keys are
    the first context_lens[i] positions of its block table: the cached prefix plus the new tokens,
    so queries are bottom-right aligned against keys.
    """

    input_ids: torch.Tensor  # [num_tokens] int64
    positions: torch.Tensor  # [num_tokens] int64, absolute position of each token
    cu_query_lens: torch.Tensor  # [num_seqs + 1] int32, prefix sums of new-token counts
    context_lens: torch.Tensor  # [num_seqs] int32, cached + new tokens per sequence
    block_tables: torch.Tensor  # [num_seqs, max_blocks_per_seq] int32, padded with 0
    slot_mapping: torch.Tensor  # [num_tokens] int64, block_id * block_size + offset per new token
    logits_indices: torch.Tensor  # [num_logits] int64, token rows whose logits are wanted
    max_query_len: int
    max_context_len: int

    @property
    def num_seqs(self) -> int:
        """Number of sequences in the batch."""
        return int(self.context_lens.shape[0])

    @property
    def num_tokens(self) -> int:
        """Number of new tokens in the batch."""
        return int(self.input_ids.shape[0])

    @property
    def is_decode_only(self) -> bool:
        """True when every sequence adds exactly one token (the paged decode path applies)."""
        return self.max_query_len == 1

"""The one growing buffer of incremental decoding: a tensor extended along its sequence axis step by step, sized
once for the whole generation and written in place (it doubles if it must grow), so a decoding step never copies
the past. The side cache's keys and mask, the side blocks' keys and values and the ladder's mask are each one."""
from __future__ import annotations

from typing import Optional

import torch


class SequenceBuffer:
    def __init__(self, data: torch.Tensor, length: int, dim: int):
        self.data, self.length, self.dim = data, length, dim

    @classmethod
    def start(cls, values: torch.Tensor, dim: int, capacity: Optional[int] = None) -> "SequenceBuffer":
        """A buffer holding `values`; with room for `capacity` positions along `dim` when that is larger."""
        n = values.shape[dim]
        if capacity is None or capacity <= n:
            return cls(values, n, dim)
        shape = list(values.shape)
        shape[dim] = capacity
        data = values.new_empty(shape)
        data.narrow(dim, 0, n).copy_(values)
        return cls(data, n, dim)

    @property
    def filled(self) -> torch.Tensor:
        return self.data.narrow(self.dim, 0, self.length)

    def append(self, values: torch.Tensor) -> None:
        n = values.shape[self.dim]
        end = self.length + n
        if end > self.data.shape[self.dim]:
            grown = SequenceBuffer.start(self.filled, self.dim, max(end, 2 * self.data.shape[self.dim]))
            self.data = grown.data
        self.data.narrow(self.dim, self.length, n).copy_(values)
        self.length = end

    def select(self, index: torch.Tensor, batch_dim: int) -> "SequenceBuffer":
        """The rows `index` along the batch axis (beam bookkeeping)."""
        return SequenceBuffer(self.data.index_select(batch_dim, index), self.length, self.dim)

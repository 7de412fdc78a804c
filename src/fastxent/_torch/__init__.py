"""The portable backend: plain PyTorch ops on any device, in row chunks of bounded size."""

from __future__ import annotations

import torch

from fastxent._torch.kernel import cross_entropy_rows, rows_per_chunk

__all__ = ["cross_entropy_rows", "rows_per_chunk", "unavailable_reason"]


def unavailable_reason(device: torch.device) -> str | None:
    """The portable backend runs wherever PyTorch does."""
    return None

"""Row stores for streaming fits: patch features are appended batch by batch, kept either in a
preallocated tensor or in an anonymous temporary file, and only selected rows are read back.

The temporary file is unlinked as soon as it is created, so nothing is left on disk when a fit
is interrupted (Ctrl-C) or killed. Rows are written and read with plain file I/O (not mmap), so
the operating system's page cache is not counted in the process's resident memory.
"""

from __future__ import annotations

import os
import tempfile

import numpy as np
import torch
from torch import Tensor

DTYPES = {"float32": torch.float32, "float16": torch.float16}


class RowStore:
    """A fixed-size (rows, dim) table filled in order.

    Args:
        rows: number of rows.
        dim: row length.
        dtype: ``"float32"`` or ``"float16"`` (storage precision; reads return float32).
        on_disk: keep the rows in an unlinked temporary file instead of memory.
    """

    def __init__(self, rows: int, dim: int, *, dtype: str = "float32", on_disk: bool = False):
        self.rows, self.dim = rows, dim
        self.dtype = DTYPES[dtype]
        self.np_dtype = np.dtype(dtype)
        self.row_bytes = dim * self.np_dtype.itemsize
        self.filled = 0
        self._fd: int | None = None
        self._data: Tensor | None = None
        if on_disk:
            fd, name = tempfile.mkstemp(prefix="patchad-features-", suffix=".bin")
            os.unlink(name)  # anonymous: gone when closed, even on a crash
            self._fd = fd
        else:
            self._data = torch.empty(rows, dim, dtype=self.dtype)

    def append(self, x: Tensor) -> None:
        """Write the next ``len(x)`` rows; x has shape (n, dim)."""
        n = x.shape[0]
        if self.filled + n > self.rows:
            raise ValueError(f"store holds {self.rows} rows, got {self.filled + n}")
        if self._data is not None:
            self._data[self.filled : self.filled + n] = x
        else:
            data = x.detach().to(self.dtype).contiguous().numpy().tobytes()
            os.pwrite(self._fd, data, self.filled * self.row_bytes)
        self.filled += n

    def all(self) -> Tensor:
        """Every row as a tensor (memory stores only; float32 only if stored as float32)."""
        if self._data is None:
            raise ValueError("all() is only available for in-memory stores")
        return self._data[: self.filled]

    def gather(self, index: Tensor) -> Tensor:
        """Rows ``index`` (shape (n,)) as float32, shape (n, dim), in the order given."""
        if self._data is not None:
            return self._data[index].float()
        out = np.empty((len(index), self.dim), dtype=self.np_dtype)
        order = np.argsort(index.numpy(), kind="stable")  # read the file front to back
        idx = index.numpy()
        for j in order:
            buf = os.pread(self._fd, self.row_bytes, int(idx[j]) * self.row_bytes)
            out[j] = np.frombuffer(buf, dtype=self.np_dtype)
        return torch.from_numpy(out).float()

    def close(self) -> None:
        """Release the memory or the temporary file."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._data = None

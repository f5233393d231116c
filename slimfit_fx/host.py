"""The host process's own memory."""
from __future__ import annotations

import ctypes


def trim_heap() -> None:
    """Hand the heap pages malloc holds free back to the kernel (glibc's
    malloc_trim), so the resident size counts what is live. A no-op elsewhere."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass

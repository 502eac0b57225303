"""Hand freed host memory back to the operating system between training steps.

glibc's allocator keeps freed chunks of its heaps resident: XLA CPU's buffers, host copies of
batches and checkpoints, tokenizer work. Over a run they fragment the heap and the resident size
keeps growing although the memory is free (``make demo``: 2.4 GB free inside the heaps at the end,
``mallinfo2``; BUILD_NOTES.md "make demo's memory"). ``malloc_trim(0)`` releases the free pages of
every heap. It is a no-op elsewhere (musl, macOS, Windows: no ``malloc_trim``).
"""

from __future__ import annotations

import ctypes
import functools

__all__ = ["release_free_memory"]


@functools.lru_cache(maxsize=None)
def _malloc_trim():
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def release_free_memory() -> bool:
    """Return the free pages of the C heaps to the OS; ``True`` if any memory was released."""
    trim = _malloc_trim()
    return bool(trim(0)) if trim is not None else False

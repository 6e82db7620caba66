"""What a sync process holds in memory beyond its data: the C allocator's settings, pandas, and
the garbage collector's work.

Arrow buffers, decoded pages and the validation's intermediate columns are allocated from the C
library (see ``ARROW_DEFAULT_MEMORY_POOL`` in the package) and freed by the megabyte. glibc's
malloc serves a large block by ``mmap`` and gives it back when it is freed, but only until the
first such block is freed: from then on it raises that threshold to the block's size, serves
blocks of that size from its heap, and keeps what is freed there for later. Fragmented across
its arenas, that kept memory grew a sync process by about 45 MB per row group validated.

The data steps therefore fix the threshold at ``LARGE_BLOCK`` once per process, and give the
heap's free pages back after each piece of work. Elsewhere than on glibc both are no-ops.

pyarrow imports pandas (about 33 MB, half a second) on its first conversion of a Python list,
only to check whether the list is a pandas object; no step converts one, so pyarrow is told at
once that pandas is not there (``withhold_pandas_from_arrow``).

The first step of a process leaves the objects alive then out of the garbage collector's full
collections (``exempt_long_lived_objects``).
"""

from __future__ import annotations

import ctypes
import functools
import gc
import importlib.abc
import logging
import sys
import threading
from collections.abc import Sequence
from importlib.machinery import ModuleSpec
from types import ModuleType

import pyarrow as pa

logger = logging.getLogger(__name__)

# Blocks from this size up are mapped on their own and unmapped when freed. Smaller ones (most
# of Python's objects, small Arrow buffers) stay on the heap, where reuse is cheap.
LARGE_BLOCK = 1 << 20

_M_MMAP_THRESHOLD = -3  # mallopt parameter, from glibc's malloc.h


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    """The process's C library, if it is glibc (the only one with both calls used here)."""
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None)
    if not all(hasattr(libc, name) for name in ("mallopt", "malloc_trim", "gnu_get_libc_version")):
        return None
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.malloc_trim.argtypes = [ctypes.c_size_t]
    return libc


@functools.cache
def map_large_blocks() -> bool:
    """Serve blocks of ``LARGE_BLOCK`` or more by ``mmap`` for the rest of the process, so that
    freeing them gives them back; True if the allocator took the setting."""
    libc = _glibc()
    taken = bool(libc and libc.mallopt(_M_MMAP_THRESHOLD, LARGE_BLOCK))
    logger.debug("large blocks mapped on their own: %s", taken)
    return taken


@functools.cache
def exempt_long_lived_objects() -> None:
    """Leave the objects alive now out of the garbage collector's full collections for the rest
    of the process (``gc.freeze``): those of Dagster, the code location and the libraries, a
    million or so, are never garbage, yet each full collection went through all of them (about
    50 ms each, five or more per sync as pages of decoded clients come and go)."""
    gc.freeze()


def give_back_free_pages() -> None:
    """Return the free pages of the allocator's heaps to the system (after a piece of work)."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


class _PandasWithheld(importlib.abc.MetaPathFinder):
    """Makes ``import pandas`` fail while it is first on ``sys.meta_path``."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        if fullname.partition(".")[0] == "pandas":
            raise ImportError("pandas is withheld from pyarrow's check for pandas objects")
        return None


_withholding = threading.Lock()


def withhold_pandas_from_arrow() -> None:
    """Have pyarrow take pandas as absent when it checks whether a value is a pandas object.

    pyarrow makes that check once per process, on its first conversion of a Python list, and
    remembers the answer. pandas itself stays importable, and pyarrow imports it when asked for
    pandas objects (``to_pandas``). A no-op once pandas is imported, or once pyarrow has checked.
    """
    with _withholding:
        if "pandas" in sys.modules:
            return
        finder = _PandasWithheld()
        sys.meta_path.insert(0, finder)
        try:
            pa.array([None])  # a first conversion (of a non-empty list): pyarrow checks here
        finally:
            sys.meta_path.remove(finder)

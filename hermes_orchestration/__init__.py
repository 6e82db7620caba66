"""Keeps icomm master data in step with Hermes e-commerce sites, as a Dagster code location."""

import os

# Arrow's default allocator (mimalloc) keeps the memory a sync step frees for its own later use,
# so a step's footprint only grows batch after batch; the C library's allocator gives it back.
# Read by Arrow when it is first imported, which the processes running syncs do after this.
os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "system")

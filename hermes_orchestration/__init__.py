"""Keeps icomm master data in step with Hermes e-commerce sites, as a Dagster code location."""

import os

# Arrow's default allocator (mimalloc) keeps the memory a sync step frees for its own later use,
# so a step's footprint only grows batch after batch; the C library's allocator gives it back.
# Read by Arrow when it is first imported, which the processes running syncs do after this.
os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "system")

# A range run records a materialization of every partition for each of its assets: 1,095 events
# for a year of daily partitions, about 10 ms each when written one by one. With a batch size,
# Dagster writes each step's materializations in one statement on PostgreSQL storage (the
# embedded SQLite storage writes them one by one either way). Read when events are stored.
os.environ.setdefault("DAGSTER_EVENT_BATCH_SIZE", "500")

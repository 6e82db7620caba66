"""What a sync process keeps of the memory it frees (``memory``), measured on fresh processes."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from hermes_orchestration import memory

on_glibc = pytest.mark.skipif(
    memory._glibc() is None, reason="the allocator settings apply to glibc only"
)

# Frees 64 blocks of 4 MB after a block of that size was freed once (which makes glibc serve that
# size from its heap), with a block of 100 kB allocated after each (which stays and keeps the heap
# from shrinking from its top); prints the resident memory before and after, in MB.
_FREE_LARGE_BLOCKS = textwrap.dedent(
    """
    import ctypes, json, sys
    from hermes_orchestration import memory

    def resident_mb():
        with open("/proc/self/status") as status:
            line = next(line for line in status if line.startswith("VmRSS"))
        return int(line.split()[1]) / 1024

    if "map" in sys.argv:
        memory.map_large_blocks()
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    size = 4 << 20
    libc.free(libc.malloc(size))
    before = resident_mb()
    large, small = [], []
    for _ in range(64):
        block = libc.malloc(size)
        ctypes.memset(block, 1, size)  # resident only once written
        large.append(block)
        small.append(libc.malloc(100_000))
    for block in large:
        libc.free(block)
    if "trim" in sys.argv:
        memory.give_back_free_pages()
    print(json.dumps({"before": before, "after": resident_mb()}))
    """
)


def kept_after_freeing(*options: str) -> float:
    """MB still resident after 256 MB of large blocks were written and freed."""
    done = subprocess.run(
        [sys.executable, "-c", _FREE_LARGE_BLOCKS, *options],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    figures = json.loads(done.stdout)
    return figures["after"] - figures["before"]


@on_glibc
def test_by_default_the_allocator_keeps_freed_large_blocks() -> None:
    # What the settings are for: without them, the freed 256 MB stay with the process.
    assert kept_after_freeing() > 200


@on_glibc
def test_large_blocks_mapped_on_their_own_are_given_back_when_freed() -> None:
    assert kept_after_freeing("map") < 32


@on_glibc
def test_free_pages_of_the_heap_are_given_back_on_request() -> None:
    assert kept_after_freeing("trim") < 32


@on_glibc
def test_the_allocator_takes_the_setting() -> None:
    assert memory.map_large_blocks() is True


# Exempts the objects alive from full collections, then makes a reference cycle and drops it;
# prints how many objects were exempted, whether a second call exempted more, and whether the
# cycle was collected.
_EXEMPT = textwrap.dedent(
    """
    import gc, json, weakref
    from hermes_orchestration import memory

    long_lived = [[n] for n in range(100_000)]
    memory.exempt_long_lived_objects()
    exempted = gc.get_freeze_count()
    memory.exempt_long_lived_objects()

    class Node:
        pass

    node = Node()
    node.itself = node
    gone = weakref.ref(node)
    del node
    gc.collect()
    print(json.dumps({
        "exempted": exempted,
        "again": gc.get_freeze_count() - exempted,
        "cycle_collected": gone() is None,
    }))
    """
)


def test_objects_alive_when_a_step_begins_are_exempted_and_later_garbage_is_collected() -> None:
    done = subprocess.run(
        [sys.executable, "-c", _EXEMPT], capture_output=True, text=True, check=True, timeout=60
    )
    figures = json.loads(done.stdout)
    assert figures["exempted"] > 100_000
    assert figures["again"] == 0  # once per process
    assert figures["cycle_collected"]


# Validates a client and loads it into a SQLite master database, as the steps do; then asks pyarrow
# for a pandas object. Prints whether pandas was imported before that, and the frame's size.
_VALIDATE_AND_LOAD = textwrap.dedent(
    """
    import json, sys
    from hermes_orchestration.masterdata import MasterDataStore
    from hermes_orchestration.records import records_to_batch
    from hermes_orchestration.validation import validate_partition

    record = {
        "id": "c-1", "email": "ana.rojas@gmail.com", "first_name": "Ana",
        "phone": "+56 9 8765 4321", "country": "CL", "accepts_marketing": True,
        "updated_at": "2024-05-01T12:00:00Z", "custom_fields": {"tienda": "Providencia"},
    }
    result = validate_partition(records_to_batch([record]))
    store = MasterDataStore(sys.argv[1])
    store.ensure_schema()
    loaded = store.load_partition(
        integration="tienda", master_database="clientes", partition_key="2024-05-01",
        valid=result.valid, rejected=result.rejected,
    )
    imported = "pandas" in sys.modules
    frame = result.valid.to_pandas()
    print(json.dumps({"pandas_imported": imported, "loaded": loaded.rows, "frame": len(frame)}))
    """
)


def test_validating_and_loading_rows_does_not_import_pandas(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", _VALIDATE_AND_LOAD, f"sqlite:///{tmp_path / 'master.sqlite'}"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    # pandas is not imported for pyarrow's check, and stays usable for whoever asks for it.
    assert json.loads(done.stdout) == {"pandas_imported": False, "loaded": 1, "frame": 1}

"""What each staged partition was made from, so that a re-sync skips the work that is unchanged.

The fetch records a digest of the records it staged for a partition (``ContentDigest``). The
validation step records, with its output, the digest of the raw content it validated combined
with everything else its result depends on (its own code, the integration's default country and
the day birth dates were checked against); when those match, the partition is not validated
again. The load records, in the master database and in the same transaction as the merge, what
it loaded; a partition whose validated content was already loaded into the same master database
is not merged again. Loads are idempotent, so skipping one changes nothing but the time it takes.
"""

from __future__ import annotations

import hashlib
from datetime import date
from functools import cache
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from hermes_orchestration.records import RAW_SCHEMA

# Key of a staged file's metadata: the digest of the content it was made from.
CONTENT_KEY = "hermes.content"
# Key of a validated file's metadata: the validation's counts, as JSON.
SUMMARY_KEY = "hermes.validation_summary"

_PACKAGE = Path(__file__).parent
_VALIDATION_CODE = ("records.py", "validation.py", "reasons.py")
_LOAD_CODE = ("masterdata.py", "masterdata_schema.py")


class ContentDigest:
    """A SHA-256 of the records of ``RAW_SCHEMA`` batches, as the site sent them, in order.

    It depends on the records alone, not on how they were split into pages or batches: an
    unchanged listing gives the same digest, so the steps after the fetch can tell that there is
    nothing new to validate or load.
    """

    def __init__(self) -> None:
        self._data = hashlib.sha256()
        self._lengths = hashlib.sha256()

    def update(self, batch: pa.RecordBatch | pa.Table) -> None:
        """Add the records of ``batch`` (after those added before)."""
        column = batch.column(RAW_SCHEMA.get_field_index("record"))
        for chunk in column.chunks if isinstance(column, pa.ChunkedArray) else [column]:
            if len(chunk) == 0:
                continue
            if chunk.null_count == 0:
                self._update_present(chunk)
                continue
            lengths = pc.binary_length(chunk).cast(pa.int64())  # a new array: no offset
            _, offsets, data = chunk.buffers()
            at = 4 * chunk.offset  # a sliced array starts at its offset-th offset (int32)
            start = int.from_bytes(memoryview(offsets)[at : at + 4], "little", signed=True)
            size = pc.sum(lengths).as_py() or 0  # None: every value null
            if data is not None:
                self._data.update(memoryview(data)[start : start + size])
            self._lengths.update(memoryview(lengths.buffers()[1])[: 8 * len(lengths)])

    def _update_present(self, chunk: pa.Array) -> None:
        """``update`` of a chunk without nulls, read from its offsets (the common case: a
        fetch adds every partition's slice of every page, and Arrow calls cost more than
        hashing a slice)."""
        _, offsets, data = chunk.buffers()
        ends = np.frombuffer(offsets, dtype=np.int32, count=len(chunk) + 1, offset=4 * chunk.offset)
        start, end = int(ends[0]), int(ends[-1])
        if data is not None:
            self._data.update(memoryview(data)[start:end])
        self._lengths.update(np.diff(ends).astype("<i8").tobytes())

    def hexdigest(self) -> str:
        """The digest so far, as hex text."""
        whole = hashlib.sha256(self._data.digest() + self._lengths.digest())
        return whole.hexdigest()


def combine(*parts: str) -> str:
    """One digest of several digests or values, in order."""
    digest = hashlib.sha256()
    for part in parts:
        encoded = part.encode()
        digest.update(len(encoded).to_bytes(8, "big") + encoded)
    return digest.hexdigest()


@cache
def code_digest(files: tuple[str, ...]) -> str:
    """A digest of the package files ``files``: what a result made by their code depends on."""
    return combine(*(hashlib.sha256((_PACKAGE / name).read_bytes()).hexdigest() for name in files))


def validated_from(raw_content: str, *, default_country: str, today: date) -> str:
    """What a validation result depends on: the raw content, the rules and their settings."""
    return combine(raw_content, code_digest(_VALIDATION_CODE), default_country, today.isoformat())


def loaded_from(validated_content: str) -> str:
    """What a load depends on besides the stored data: the validated content, the merge code."""
    return combine(validated_content, code_digest(_LOAD_CODE))

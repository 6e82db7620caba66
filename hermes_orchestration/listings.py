"""What a fetch remembers of the listing it staged, so that pages that come back unchanged are
not flattened and staged again.

Once a fetch of a window has staged its partitions, it records, next to the staged files, a
digest of each page's records, how many rows of each partition each page held, and the content
digest of each partition's file. The next fetch of the same window compares its pages with these
in order: as long as they match, their rows are already staged, in the same order, and are only
counted. From the first page that differs on, the fetch stages as usual, starting each partition
with the rows it keeps of the staged file. An unchanged listing rewrites nothing.

The record is only a shortcut: it is used only if every partition's staged file is still the one
it describes, and it is ignored (the fetch stages everything) when missing, unreadable, or made by
another version of the code that flattens and files the rows, or for another window.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from hermes_orchestration.fingerprints import CONTENT_KEY, code_digest
from hermes_orchestration.records import encode
from hermes_orchestration.staging import RAW, PartitionStaging

_VERSION = 1
# What decides the rows a page stages and the partition each is filed under.
_STAGING_CODE = ("records.py", "listings.py", "sync.py")


@dataclass(frozen=True)
class PageEntry:
    """One page of a listing: the digest of its records, its rows per partition index, and the
    partition of its last row (where a next row without a usable ``updated_at`` is filed)."""

    digest: str | None  # None: records too deeply nested to encode, never taken as unchanged
    rows: tuple[tuple[int, int], ...]
    last: int

    @property
    def count(self) -> int:
        return sum(rows for _, rows in self.rows)


@dataclass(frozen=True)
class Listing:
    """The pages of the latest fetch of a window, and the content of each partition it staged."""

    pages: list[PageEntry]
    contents: dict[str, str]  # partition key -> content digest of its staged raw file


def page_digest(records: list[Any]) -> str | None:
    """A digest of a page's records as decoded (its body holds a cursor that differs each time);
    None for records nested too deeply to encode again (records.TOO_DEEP)."""
    try:
        encoded = encode(records)
    except orjson.JSONEncodeError:
        return None
    return _digest(encoded)


def digest_of_encoded(encoded: list[bytes]) -> str:
    """``page_digest`` of the records whose ``encode_each`` is ``encoded`` (a list encodes as
    its items' encodings, comma-separated in brackets)."""
    return _digest(b"[" + b",".join(encoded) + b"]")


def _digest(encoded: bytes) -> str:
    return hashlib.blake2b(encoded, digest_size=16).hexdigest()


def previous_listing(staging: PartitionStaging, keys: list[str], window: str) -> Listing | None:
    """The listing of the latest fetch of ``window`` into partitions ``keys``, if every one of
    their staged files is still the one it staged; else None."""
    try:
        stored = orjson.loads(_path(staging, keys).read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return None
    if not isinstance(stored, dict) or stored.get("identity") != _identity(keys, window):
        return None
    try:
        contents = {key: str(stored["contents"][key]) for key in keys}
        pages = [
            PageEntry(
                None if digest is None else str(digest),
                tuple((int(index), int(rows)) for index, rows in counts),
                int(last),
            )
            for digest, counts, last in stored["pages"]
        ]
    except (KeyError, TypeError, ValueError):
        return None
    for key in keys:
        if staging.metadata(RAW, key).get(CONTENT_KEY) != contents[key]:
            return None  # staged again since, by another run
    return Listing(pages, contents)


def record_listing(
    staging: PartitionStaging,
    keys: list[str],
    window: str,
    pages: list[PageEntry],
    contents: dict[str, str],
) -> None:
    """Record the listing just staged (replacing the file at once, never half-written)."""
    path = _path(staging, keys)
    stored = {
        "identity": _identity(keys, window),
        "contents": contents,
        "pages": [[page.digest, [list(pair) for pair in page.rows], page.last] for page in pages],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
    try:
        temporary.write_bytes(orjson.dumps(stored))
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def _identity(keys: list[str], window: str) -> list[Any]:
    return [_VERSION, window, keys, code_digest(_STAGING_CODE)]


def _path(staging: PartitionStaging, keys: list[str]) -> Path:
    first = staging.path(RAW, keys[0])
    last = staging.path(RAW, keys[-1]).name.removesuffix(".parquet")
    return first.with_name(f"{first.name.removesuffix('.parquet')}--{last}.listing.json")

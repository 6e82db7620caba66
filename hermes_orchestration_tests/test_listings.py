"""A fetch stages again only the pages that changed since the last fetch of the same window.

Whatever it reuses, the staged files end exactly as if every page had been staged: the same
rows in the same order, with the same content digest.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from hermes_orchestration import listings
from hermes_orchestration import staging as staging_module
from hermes_orchestration.fingerprints import CONTENT_KEY
from hermes_orchestration.records import encode_each
from hermes_orchestration.staging import RAW, PartitionStaging
from hermes_orchestration.sync import _RawPartitions

KEYS = ["2026-11-02", "2026-11-03", "2026-11-04"]
STARTS = [datetime(2026, 11, day, tzinfo=UTC) for day in (3, 4)]
WINDOW = "[2026-11-02T00:00:00+00:00, 2026-11-05T00:00:00+00:00)"


def client(number: int, day: int, name: str = "Ana") -> dict[str, str]:
    return {
        "id": str(number),
        "first_name": name,
        "email": f"cliente{number}@ejemplo.cl",
        "updated_at": f"2026-11-0{day}T{number % 24:02d}:00:00Z",
    }


def listing(*changes: tuple[int, str]) -> list[list[dict[str, str]]]:
    """Five pages of four clients over three days; ``changes`` rename some clients."""
    renamed = dict(changes)
    clients = [client(n, 2 + n * 3 // 20, renamed.get(n, "Ana")) for n in range(20)]
    return [clients[start : start + 4] for start in range(0, 20, 4)]


def stage(staging: PartitionStaging, pages: list[list[dict]], *, reuse: bool = True) -> dict:
    """Fetch ``pages`` as the fetch step does; what it did and what each partition holds."""
    previous = listings.previous_listing(staging, KEYS, WINDOW) if reuse else None
    with staging.transaction() as writes:
        staged = _RawPartitions(writes, staging, KEYS, STARTS, previous)
        for page in pages:
            staged.page(page)
        staged.complete()
    staged.record(WINDOW)
    record = next(staging.path(RAW, KEYS[0]).parent.glob("*.listing.json"))
    return {
        "pages_as_before": staged.pages_as_before,
        "counts": staged.counts,
        "files": {key: staging.version(RAW, key) for key in KEYS},
        "record": record.stat().st_mtime_ns,
        "rows": {key: staging.read(RAW, key).to_pylist() for key in KEYS},
        "contents": {key: staging.metadata(RAW, key)[CONTENT_KEY] for key in KEYS},
    }


@pytest.fixture(params=[None, 3], ids=["row-groups-of-32768", "row-groups-of-3"])
def staging(
    tmp_path: Path, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> PartitionStaging:
    if request.param:  # rows kept are then copied from several row groups of the staged file
        monkeypatch.setattr(staging_module, "ROW_GROUP_ROWS", request.param)
    return PartitionStaging(tmp_path / "staging", "tienda_test")


@pytest.fixture
def fresh(tmp_path: Path) -> PartitionStaging:
    """Another staging folder, where every page is staged as it comes."""
    return PartitionStaging(tmp_path / "fresh", "tienda_test")


def test_an_unchanged_listing_is_counted_and_rewrites_no_file(staging) -> None:
    first = stage(staging, listing())
    again = stage(staging, listing())
    assert again["pages_as_before"] == 5
    assert again["files"] == first["files"]  # not one file written again
    assert again["record"] == first["record"]
    assert again["counts"] == first["counts"] == [7, 7, 6]
    assert again["contents"] == first["contents"]


@pytest.mark.parametrize(
    "pages",
    [
        pytest.param(listing((17, "Bea")), id="changed-in-the-last-partition"),
        pytest.param(listing((5, "Bea")), id="changed-in-the-middle-of-a-partition"),
        pytest.param(listing((0, "Bea")), id="changed-on-the-first-page"),
        pytest.param(listing()[:3], id="fewer-pages"),
        pytest.param([*listing()[:2], listing()[2][:2]], id="a-shorter-last-page"),
        pytest.param([*listing(), [client(30, 4)]], id="one-more-page"),
        pytest.param(
            [*listing()[:4], [client(31, 2), *listing()[4]]], id="a-late-row-for-a-kept-partition"
        ),
    ],
)
def test_a_changed_listing_stages_exactly_what_staging_every_page_would(
    staging, fresh, pages
) -> None:
    stage(staging, listing())
    reused = stage(staging, pages)
    expected = stage(fresh, pages, reuse=False)
    assert reused["rows"] == expected["rows"]
    assert reused["contents"] == expected["contents"]
    assert reused["counts"] == expected["counts"]


def test_pages_before_the_first_change_are_not_staged_again(staging) -> None:
    first = stage(staging, listing())
    again = stage(staging, listing((17, "Bea")))  # on the fifth page, in the third partition
    assert again["pages_as_before"] == 4
    # The first two partitions were listed again whole: their files stand as they were.
    assert [again["files"][key] == first["files"][key] for key in KEYS] == [True, True, False]


def test_the_shortcut_is_not_taken_when_a_staged_file_was_replaced_since(staging) -> None:
    stage(staging, listing())
    with staging.transaction() as writes:  # another run stages the second partition anew
        staged = _RawPartitions(writes, staging, KEYS[1:2], [], previous=None)
        staged.page([client(99, 3)])
        staged.complete()
    assert listings.previous_listing(staging, KEYS, WINDOW) is None
    assert stage(staging, listing())["pages_as_before"] == 0


def test_the_shortcut_is_not_taken_for_another_window_or_a_damaged_record(staging) -> None:
    stage(staging, listing())
    assert listings.previous_listing(staging, KEYS, WINDOW.replace("05", "06")) is None
    path = next(staging.path(RAW, KEYS[0]).parent.glob("*.listing.json"))
    path.write_text('{"identity": [1, "half-written', encoding="utf-8")
    assert listings.previous_listing(staging, KEYS, WINDOW) is None
    assert stage(staging, listing())["rows"] == stage(staging, listing(), reuse=False)["rows"]


def test_a_page_too_deeply_nested_to_encode_is_always_staged_again(staging, fresh) -> None:
    deep: object = "fondo"
    for _ in range(300):  # more levels than the JSON encoder takes
        deep = [deep]
    pages = listing()
    pages[2] = [{**pages[2][0], "custom_fields": {"capas": deep}}, *pages[2][1:]]
    stage(staging, pages)
    again = stage(staging, pages)
    assert again["pages_as_before"] == 2  # the pages before it
    assert again["rows"] == stage(fresh, pages, reuse=False)["rows"]


def test_a_row_without_an_instant_after_kept_pages_is_filed_where_staging_every_page_files_it(
    staging, fresh
) -> None:
    # Such a row stays with the row before it: here the late row that ends the third page.
    before = listing()
    before[2] = [*before[2], client(40, 2)]
    after = [page.copy() for page in before]
    after[3] = [{"id": "50", "email": "sin@ejemplo.cl"}, *after[3]]
    stage(staging, before)
    reused = stage(staging, after)
    assert reused["pages_as_before"] == 3
    assert reused["rows"] == stage(fresh, after, reuse=False)["rows"]


def test_a_page_digest_is_the_same_from_the_records_as_from_their_encodings() -> None:
    # A fetch with nothing to compare with digests its pages from the encodings it stages; the
    # next fetch of the window digests the decoded records to compare them: both must agree.
    page = [
        client(1, 2, "Ñandú 🦤"),
        {**client(2, 2), "custom_fields": {"tier": "gold", "tags": ["a", 1, 2.5, None, True]}},
        {**client(3, 3), 7: "a key that is not text"},
        42,
        None,
        ["not", "an", "object"],
    ]
    assert listings.digest_of_encoded(encode_each(page)) == listings.page_digest(page)
    assert listings.digest_of_encoded(encode_each(page[:2])) != listings.page_digest(page)

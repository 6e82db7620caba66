"""A re-sync redoes only what changed: unchanged content is neither validated nor merged again.

The fetch always lists the whole window (the site cannot say what changed); what it staged is
compared, by digest, with what the partition's last validation and load were made from.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path

import dagster as dg
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hermes_orchestration.assets import MASTER_DATA, RAW_CLIENTS, VALIDATED_CLIENTS, asset_key
from hermes_orchestration.cli import main
from hermes_orchestration.code_location import build_definitions
from hermes_orchestration.config import load_integrations
from hermes_orchestration.fingerprints import ContentDigest, loaded_from, validated_from
from hermes_orchestration.jobs import sync_job_name
from hermes_orchestration.launch import sync_now
from hermes_orchestration.masterdata import MasterDataStore
from hermes_orchestration.records import records_to_batch
from hermes_orchestration.simulator import HermesSimulator, SimulatorConfig
from hermes_orchestration.staging import RAW, VALID, PartitionStaging
from hermes_orchestration_tests.conftest import SIM_END, SIM_PARTITIONS, SIM_START, TOKEN
from hermes_orchestration_tests.test_asset_chain import (
    SANTIAGO,
    asset_key_for,
    metadata_of,
    table_rows,
)

PARTITION = SIM_PARTITIONS[2]
MASTER_TABLES = {
    "master_contacts": "SELECT * FROM master_contacts ORDER BY id",
    "contact_sources": "SELECT * FROM contact_sources ORDER BY integration, hermes_id",
    "rejected_clients": "SELECT * FROM rejected_clients ORDER BY id",
    "master_databases": "SELECT * FROM master_databases ORDER BY name",
}


def run(instance: dg.DagsterInstance, *, full: bool = False) -> dg.ExecuteInProcessResult:
    config = load_integrations()
    integration = config.integrations[0]
    result = sync_now(build_definitions(config), integration, instance, first=PARTITION, full=full)
    assert result.success
    return result


def steps(result: dg.ExecuteInProcessResult, name: str = "tienda_test") -> tuple[dict, dict]:
    """The validation and load metadata of a run of integration ``name``."""
    return (
        metadata_of(result, asset_key_for(name, VALIDATED_CLIENTS)),
        metadata_of(result, asset_key_for(name, MASTER_DATA)),
    )


def snapshot(url: str) -> dict[str, list[tuple]]:
    return {name: table_rows(url, query) for name, query in MASTER_TABLES.items()}


def master_data(url: str) -> dict[str, list[tuple]]:
    """The content of the master database: a reload rewrites the rejected rows of its partition
    (new ids and times) and leaves the rest as it was."""
    rows = snapshot(url)
    rows["rejected_clients"] = table_rows(
        url,
        "SELECT integration, partition_key, hermes_id, updated_at, reasons, record "
        "FROM rejected_clients ORDER BY integration, partition_key, hermes_id, record",
    )
    return rows


def valid_file(state_dir: Path, name: str, stage: str = VALID) -> Path:
    return PartitionStaging(state_dir / "staging", name).path(stage, PARTITION)


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_an_unchanged_resync_neither_validates_nor_merges_again_and_reports_the_same_counts(
    database: str, request, integrations_file, state_dir, monkeypatch
) -> None:
    name = f"tienda_resync_{database}"  # its own rows in the session's PostgreSQL database
    integrations_file(name)
    if database == "postgresql":
        url = request.getfixturevalue("postgres_url")
        monkeypatch.setenv("HERMES_MASTERDATA_URL", url)
    else:
        url = f"sqlite:///{state_dir / 'masterdata.sqlite'}"
    with dg.instance_for_test() as instance:
        validated, loaded = steps(run(instance), name)
        assert validated["partitions_unchanged"] == loaded["partitions_unchanged"] == 0
        stored = snapshot(url)
        staged = valid_file(state_dir, name).stat().st_mtime_ns
        raw = valid_file(state_dir, name, RAW).stat().st_mtime_ns

        again = run(instance)
        again_validated, again_loaded = steps(again, name)
        fetched = metadata_of(again, asset_key_for(name, RAW_CLIENTS))

    # The fetch listed every page again, all as before: it staged none of them again.
    assert fetched["pages_as_before"] == fetched["pages"] > 0
    assert valid_file(state_dir, name, RAW).stat().st_mtime_ns == raw

    assert again_validated["partitions_unchanged"] == 1
    assert again_loaded["partitions_unchanged"] == 1
    # The same counts as the first validation, from the staged result it left.
    for count in ("rows_fetched", "rows_valid", "rows_rejected", "duplicates_dropped"):
        assert again_validated[count] == validated[count], count
    assert again_validated["rejected_by_reason"] == validated["rejected_by_reason"]
    # Nothing was rewritten: not the staged file, not one row (loaded_at included).
    assert valid_file(state_dir, name).stat().st_mtime_ns == staged
    assert snapshot(url) == stored
    assert again_loaded["rows"] == loaded["rows"] == again_loaded["sources_unchanged"]
    assert again_loaded["rejected"] == loaded["rejected"]
    assert again_loaded["rejected_by_reason"] == loaded["rejected_by_reason"] != {}
    assert again_loaded["sources_inserted"] == again_loaded["sources_updated"] == 0
    assert again_loaded["contacts_inserted"] == again_loaded["contacts_updated"] == 0


def test_the_load_does_not_count_again_the_ids_that_validation_counted(
    integrations_file, monkeypatch
) -> None:
    # Validation counts repeated ids (none here); the load is told, and does not gather a
    # partition's ids to count them again (35 MB at 1,000,000 clients).
    integrations_file("tienda_ids_counted")  # its own master data: a first load
    told: list[bool] = []
    load_partitions = MasterDataStore.load_partitions

    def noting(self: MasterDataStore, **kwargs) -> object:
        told.extend(partition.ids_unique for partition in kwargs["partitions"])
        return load_partitions(self, **kwargs)

    monkeypatch.setattr(MasterDataStore, "load_partitions", noting)
    with dg.instance_for_test() as instance:
        run(instance)
    assert told == [True]


def test_a_full_sync_validates_and_merges_again_and_changes_nothing(
    integrations_file, state_dir
) -> None:
    integrations_file("tienda_test")
    url = f"sqlite:///{state_dir / 'masterdata.sqlite'}"
    with dg.instance_for_test() as instance:
        _, loaded = steps(run(instance))
        stored = master_data(url)
        result = run(instance, full=True)
        assert instance.get_run_by_id(result.run_id).tags["hermes/full_sync"] == "true"
    validated, reloaded = steps(result)
    assert validated["partitions_unchanged"] == reloaded["partitions_unchanged"] == 0
    assert reloaded["sources_unchanged"] == loaded["sources_inserted"]
    assert reloaded["contacts_inserted"] == reloaded["contacts_updated"] == 0
    assert master_data(url) == stored


def test_the_command_line_says_what_was_unchanged_and_full_does_it_all_again(
    integrations_file, state_dir, tmp_path: Path, monkeypatch, capsys
) -> None:
    integrations_file("tienda_test")
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path))

    def sync(*extra: str) -> str:
        assert main(["sync", "tienda_test", "--partition", PARTITION, *extra]) == 0
        return capsys.readouterr().out

    assert "partitions_unchanged 0" in sync()
    assert "partitions_unchanged 1" in sync()
    assert "contacts_inserted 0, contacts_updated 0" in (full := sync("--full"))
    assert "partitions_unchanged 0" in full


def test_a_master_database_that_lacks_the_load_is_loaded_again(
    integrations_file, state_dir, monkeypatch, tmp_path: Path
) -> None:
    integrations_file("tienda_test")
    with dg.instance_for_test() as instance:
        _, loaded = steps(run(instance))
        # A new, empty master database (restored, or another server): the staged validation is
        # still good, but the rows must be loaded into it.
        fresh = f"sqlite:///{tmp_path / 'fresh.sqlite'}"
        monkeypatch.setenv("HERMES_MASTERDATA_URL", fresh)
        validated, reloaded = steps(run(instance))
    assert validated["partitions_unchanged"] == 1
    assert reloaded["partitions_unchanged"] == 0
    assert reloaded["sources_inserted"] == loaded["sources_inserted"] > 0
    assert table_rows(fresh, "SELECT count(*) FROM contact_sources") == [
        (loaded["sources_inserted"],)
    ]


def test_raw_rows_staged_without_a_digest_are_never_taken_as_unchanged(
    integrations_file, state_dir
) -> None:
    integrations_file("tienda_test")
    config = load_integrations()
    integration = config.integrations[0]
    job = build_definitions(config).resolve_job_def(sync_job_name(integration))
    after_fetch = [asset_key(integration, VALIDATED_CLIENTS), asset_key(integration, MASTER_DATA)]
    with dg.instance_for_test() as instance:
        run(instance)
        # Raw rows as a version without digests staged them: the same rows, no metadata.
        raw = PartitionStaging(state_dir / "staging", "tienda_test").path(RAW, PARTITION)
        pq.write_table(pq.read_table(raw).replace_schema_metadata(None), raw)
        for _ in range(2):
            result = job.execute_in_process(
                instance=instance, asset_selection=after_fetch, partition_key=PARTITION
            )
            assert result.success
            validated, loaded = steps(result)
            assert validated["partitions_unchanged"] == loaded["partitions_unchanged"] == 0


def test_a_client_changed_on_the_site_is_validated_and_loaded_again(
    integrations_file, state_dir, monkeypatch
) -> None:
    config = SimulatorConfig(
        clients=300, seed=5, start=SIM_START, end=SIM_END, tokens={TOKEN: ("clients:read",)}
    )
    with HermesSimulator(config) as site:
        site.start()
        path = integrations_file("tienda_test")
        path.write_text(path.read_text().replace(site_url_of(path), site.url))
        url = f"sqlite:///{state_dir / 'masterdata.sqlite'}"
        day = datetime.fromisoformat(PARTITION).replace(tzinfo=SANTIAGO)
        with dg.instance_for_test() as instance:
            run(instance)
            client = next(
                record
                for record in site.dataset.window(day, day + timedelta(days=1))
                if record["id"] not in site.dataset.dirty and record.get("deleted_at") is None
            )
            changed = {
                **client,
                "first_name": "Renombrada",
                "updated_at": (day + timedelta(hours=23, minutes=59)).isoformat(),
            }
            site.dataset.add_records([changed])
            validated, loaded = steps(run(instance))
    assert validated["partitions_unchanged"] == loaded["partitions_unchanged"] == 0
    assert loaded["sources_updated"] == 1
    assert table_rows(
        url,
        "SELECT first_name FROM contact_sources WHERE hermes_id = :id",
        id=client["id"],
    ) == [("Renombrada",)]


def site_url_of(path: Path) -> str:
    line = next(line for line in path.read_text().splitlines() if "site_url:" in line)
    return line.split("site_url:", 1)[1].strip()


# --- Digests ----------------------------------------------------------------------------------


RECORDS = [
    {"id": f"{index:08d}", "email": f"cliente{index}@ejemplo.cl", "updated_at": "2026-11-02T10:00Z"}
    for index in range(120)
]


def digest(*parts: pa.RecordBatch | pa.Table) -> str:
    content = ContentDigest()
    for part in parts:
        content.update(part)
    return content.hexdigest()


def test_the_content_digest_depends_on_the_records_not_on_how_pages_split_them() -> None:
    whole = records_to_batch(RECORDS)
    assert digest(whole) == digest(records_to_batch(RECORDS[:37]), records_to_batch(RECORDS[37:]))
    assert digest(whole) == digest(whole.slice(0, 50), whole.slice(50))
    assert digest(whole) == digest(pa.Table.from_batches([whole.slice(0, 7), whole.slice(7)]))


def test_missing_raw_records_digest_alike_however_the_rows_are_split() -> None:
    whole = pa.Table.from_batches([records_to_batch(RECORDS)])
    at = whole.schema.get_field_index("record")
    records = whole.column(at).to_pylist()
    holed = whole.set_column(
        at, "record", pa.array([None if i % 5 == 0 else r for i, r in enumerate(records)])
    )
    # Row 0 alone is all missing, rows 1-4 have none missing, the rest some.
    assert digest(holed) == digest(holed.slice(0, 1), holed.slice(1, 4), holed.slice(5))
    assert digest(holed) != digest(whole)


def test_the_content_digest_changes_with_any_record() -> None:
    base = digest(records_to_batch(RECORDS))
    assert digest(records_to_batch(RECORDS[:-1])) != base
    assert digest(records_to_batch(list(reversed(RECORDS)))) != base
    edited = [*RECORDS[:-1], {**RECORDS[-1], "email": "otra@ejemplo.cl"}]
    assert digest(records_to_batch(edited)) != base
    # The same text cut into records differently ("1" "23" and "12" "3") is different content.
    assert digest(records_to_batch([1, 23])) != digest(records_to_batch([12, 3]))
    assert digest() != base


def test_a_validation_is_redone_when_its_rules_settings_or_day_change() -> None:
    day = datetime(2026, 11, 27).date()
    same = validated_from("raw", default_country="CL", today=day)
    assert same == validated_from("raw", default_country="CL", today=day)
    assert validated_from("raw2", default_country="CL", today=day) != same
    assert validated_from("raw", default_country="AR", today=day) != same
    assert validated_from("raw", default_country="CL", today=day + timedelta(days=1)) != same
    assert loaded_from(same) != loaded_from(validated_from("raw2", default_country="CL", today=day))

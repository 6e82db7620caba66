"""The asset chain of one integration: fetch Hermes clients -> validate -> load into master data.

Every asset is partitioned by the integration's calendar and has a single-run backfill policy: a
range of partitions is one run that fetches the whole range with one paged listing. Inside the run
each partition is still validated and loaded on its own, so a range gives exactly the results of
running its partitions one by one.

The steps' bodies (``sync``) are imported when a step runs: the processes that only read the
definitions (the code server, sensors, ``hermes-orchestration status``) do without Arrow, the
validation libraries and the database drivers.
"""

# No `from __future__ import annotations`: Dagster inspects the context annotations at runtime.

from collections.abc import Sequence

import dagster as dg

from hermes_orchestration.config import Integration
from hermes_orchestration.partitions import partitions_def_for
from hermes_orchestration.tags import run_tags

RAW_CLIENTS = "raw_clients"
VALIDATED_CLIENTS = "validated_clients"
MASTER_DATA = "master_data"

REJECT_RATIO_CHECK = "reject_ratio_within_limit"
UNIQUE_IDS_CHECK = "no_duplicate_ids"
REQUIRED_FIELDS_CHECK = "required_fields_present"


def asset_key(integration: Integration, name: str) -> dg.AssetKey:
    """``hermes/<integration>/<name>``."""
    return dg.AssetKey(["hermes", integration.name, name])


def integration_asset_keys(integration: Integration) -> list[dg.AssetKey]:
    """The three asset keys of an integration, upstream first."""
    return [asset_key(integration, name) for name in (RAW_CLIENTS, VALIDATED_CLIENTS, MASTER_DATA)]


def pool_name(integration: Integration) -> str:
    """The concurrency pool of an integration's assets: ``hermes_<name>``."""
    return f"hermes_{integration.name}"


def build_integration_assets(integration: Integration) -> Sequence[dg.AssetsDefinition]:
    """The three partitioned assets of ``integration``, in a group named after it."""
    common = {
        "partitions_def": partitions_def_for(integration),
        "group_name": integration.name,
        "backfill_policy": dg.BackfillPolicy.single_run(),
        # One pool per site: runs of one integration never exceed its rate limit together.
        "pool": pool_name(integration),
        "tags": run_tags(integration),
    }
    raw_key = asset_key(integration, RAW_CLIENTS)
    validated_key = asset_key(integration, VALIDATED_CLIENTS)

    @dg.asset(
        key=raw_key,
        description=(
            f"Clients of {integration.display_name} ({integration.site_url}) whose updated_at "
            "falls in the partition's window, fetched page by page and stored as Parquet."
        ),
        kinds={"hermes", "parquet"},
        required_resource_keys={"hermes_api", "staging"},
        **common,
    )
    def raw_clients(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
        from hermes_orchestration.sync import fetch_raw_clients

        return fetch_raw_clients(context, integration)

    @dg.asset(
        key=validated_key,
        deps=[raw_key],
        description=(
            "Clients checked and normalized: required fields, e-mail, RUT, phone, dates, country; "
            "duplicates by id resolved to the latest updated_at; rejected rows kept with reasons."
        ),
        kinds={"parquet"},
        required_resource_keys={"staging"},
        check_specs=[
            dg.AssetCheckSpec(
                REJECT_RATIO_CHECK,
                asset=validated_key,
                blocking=True,
                description=(
                    f"At most {integration.max_reject_ratio:.1%} of the rows are rejected; above "
                    "it the load into master data does not run."
                ),
            ),
            dg.AssetCheckSpec(
                UNIQUE_IDS_CHECK, asset=validated_key, description="Every client id appears once."
            ),
            dg.AssetCheckSpec(
                REQUIRED_FIELDS_CHECK,
                asset=validated_key,
                description="id and updated_at on every row; email on every live client.",
            ),
        ],
        **common,
    )
    def validated_clients(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
        from hermes_orchestration.sync import validate_clients

        return validate_clients(context, integration)

    @dg.asset(
        key=asset_key(integration, MASTER_DATA),
        deps=[validated_key],
        description=(
            f"Clients merged into the master database '{integration.master_database}': an "
            "idempotent, transactional upsert that never lets older data overwrite newer."
        ),
        kinds={"sql"},
        required_resource_keys={"staging", "masterdata"},
        freshness_policy=dg.FreshnessPolicy.time_window(
            fail_window=integration.freshness.fail_after,
            warn_window=integration.freshness.warn_after,
        ),
        **common,
    )
    def master_data(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
        from hermes_orchestration.sync import load_master_data

        return load_master_data(context, integration)

    return [raw_clients, validated_clients, master_data]

"""The Dagster UI as data engineers and analysts see it: headless Chromium on the running stack.

Chromium is Debian's (``scripts/ensure-services`` installs it), driven by Playwright through its
executable path. Every page a test looks at is saved as a screenshot under
``test-artifacts/ui/``, and each test's last view too, so that a failure can be seen.
"""

from __future__ import annotations

import contextlib
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright
from playwright.sync_api import TimeoutError as PlaywrightTimeoutError

from hermes_orchestration.assets import (
    MASTER_DATA,
    RAW_CLIENTS,
    REJECT_RATIO_CHECK,
    REQUIRED_FIELDS_CHECK,
    UNIQUE_IDS_CHECK,
    VALIDATED_CLIENTS,
)
from hermes_orchestration.checks import HEALTH_CHECK
from hermes_orchestration.sensors import GUARD_SENSOR
from hermes_orchestration_tests.stack import (
    ARTIFACTS,
    DISABLED,
    INTEGRATIONS,
    LOCATION,
    MANUAL,
    MASTER_DATABASES,
    ROOT,
    SCHEDULED,
    Stack,
)

pytest_plugins = ["hermes_orchestration_tests.stack"]  # the dagster_stack fixture
pytestmark = [pytest.mark.browser, pytest.mark.stack, pytest.mark.postgres]

CHROMIUM = Path("/usr/bin/chromium")
# Playwright's own browser download is not used: Debian's Chromium, quiet and offline.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]
SCREENSHOTS = ARTIFACTS / "ui"
TIMEOUT_MS = 30_000
# Assertions wait as long as actions: on a busy 2-core machine the UI may take over 5 s to fill in.
expect.set_options(timeout=TIMEOUT_MS)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """Headless Chromium; installed first if it is missing and this machine allows it."""
    if not CHROMIUM.exists():
        subprocess.run([ROOT / "scripts" / "ensure-services"], check=False, timeout=900)
    if not CHROMIUM.exists():
        pytest.skip(
            f"{CHROMIUM} is missing and could not be installed (needs root and apt: "
            "apt-get install chromium); the UI tests need Debian's Chromium"
        )
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
        )
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser: Browser, dagster_stack: Stack, request: pytest.FixtureRequest) -> Iterator[Page]:
    """A fresh browser tab on the stack's webserver; its last view is saved when the test ends."""
    context = browser.new_context(
        base_url=dagster_stack.webserver_url, viewport={"width": 1440, "height": 900}
    )
    context.set_default_timeout(TIMEOUT_MS)
    tab = context.new_page()
    yield tab
    tab.screenshot(path=SCREENSHOTS / f"{request.node.name}.last.png")
    context.close()


def screenshot(page: Page, name: str) -> Path:
    """Save the page, once it has filled in, as ``test-artifacts/ui/<name>.png``."""
    expect(page.get_by_text(re.compile(r"^Loading"))).to_have_count(0)
    # The UI polls the server, so the network may never stay idle: the picture is taken anyway.
    with contextlib.suppress(PlaywrightTimeoutError):
        page.wait_for_load_state("networkidle", timeout=5_000)
    path = SCREENSHOTS / f"{name}.png"
    page.screenshot(path=path)
    return path


def group_lineage(integration: str) -> str:
    return f"/locations/{LOCATION}/asset-groups/{integration}/lineage"


def test_an_integrations_asset_graph_shows_its_three_assets(
    page: Page, dagster_stack: Stack
) -> None:
    # The schedule's first tick syncs the integration within a minute or two of the stack's start.
    dagster_stack.wait_for_materialization(["hermes", SCHEDULED, MASTER_DATA], timeout=180)
    page.goto(group_lineage(SCHEDULED))
    expect(page.get_by_text(f"{SCHEDULED}", exact=True).first).to_be_visible()
    for name in (RAW_CLIENTS, VALIDATED_CLIENTS, MASTER_DATA):
        expect(page.locator(f'[data-tooltip="{name}"]')).to_have_count(1)
    # The graph is the integration's own: no asset of another integration is drawn.
    expect(page.locator("[data-tooltip]").filter(has_text="tienda_sur")).to_have_count(0)
    expect(page.get_by_text("Latest event").first).to_be_visible()
    screenshot(page, "asset-graph")


def test_the_master_data_page_shows_the_sync_metadata_and_checks(
    page: Page, dagster_stack: Stack
) -> None:
    dagster_stack.wait_for_materialization(["hermes", SCHEDULED, MASTER_DATA], timeout=180)
    asset = f"/assets/hermes/{SCHEDULED}/{MASTER_DATA}"
    page.goto(asset)
    metadata = page.get_by_role("table").filter(has_text="contacts_inserted")
    for key in ("rows", "contacts_inserted", "contacts_updated", "rejected"):
        expect(metadata.get_by_text(key, exact=True)).to_be_visible()
    expect(page.get_by_text(f"master_database: {MASTER_DATABASES[SCHEDULED]}")).to_be_visible()
    screenshot(page, "master-data")

    page.goto(f"{asset}?view=checks")
    expect(page.get_by_text(HEALTH_CHECK, exact=True).first).to_be_visible()
    screenshot(page, "master-data-checks")

    # The data-quality checks live on validated_clients, the step that judges the rows.
    page.goto(f"/assets/hermes/{SCHEDULED}/{VALIDATED_CLIENTS}?view=checks")
    for check in (REJECT_RATIO_CHECK, UNIQUE_IDS_CHECK, REQUIRED_FIELDS_CHECK):
        expect(page.get_by_text(check, exact=True).first).to_be_visible()
    # A tick's run may be evaluating them right now; none of them has failed.
    expect(page.get_by_text("Failed", exact=True)).to_have_count(0)
    screenshot(page, "validated-clients-checks")


def automation_row(page: Page, kind: str, name: str):
    """The row of a schedule or sensor in the Automation list."""
    link = page.locator(f'a[href$="/{kind}/{name}"]')
    return page.locator("[data-index]").filter(has=link)


def test_the_automation_page_lists_each_integrations_schedule_and_the_guard_with_their_state(
    page: Page,
) -> None:
    page.goto("/automation?type=schedules")
    expected = {name: name != DISABLED for name in INTEGRATIONS}
    for name, running in expected.items():
        row = automation_row(page, "schedules", f"hermes_{name}_schedule")
        toggle = row.locator("input[type=checkbox]")
        expect(toggle).to_have_count(2)  # the row's selection box, then its on/off switch
        if running:
            expect(toggle.last).to_be_checked()
        else:
            expect(toggle.last).not_to_be_checked()
    expect(automation_row(page, "schedules", "hermes_tienda_norte_schedule")).to_contain_text(
        "Every minute"
    )
    screenshot(page, "schedules")

    page.goto("/automation?type=sensors")
    guard = automation_row(page, "sensors", GUARD_SENSOR)
    expect(guard.locator("input[type=checkbox]")).to_have_count(2)
    expect(guard.locator("input[type=checkbox]").last).to_be_checked()
    screenshot(page, "sensors")


BACKFILL_QUERY = """
query Backfill($id: String!) {
  partitionBackfillOrError(backfillId: $id) {
    __typename
    ... on PartitionBackfill {
      status
      runs(limit: 10) { runId status tags { key value } }
    }
  }
}
"""


def test_a_backfill_of_a_partition_range_launched_from_the_ui_completes(
    page: Page, dagster_stack: Stack
) -> None:
    stack = dagster_stack
    first, last = stack.partition_key(3), stack.partition_key(5)
    page.goto(group_lineage(MANUAL))
    page.get_by_role("button", name="Materialize all").click()
    dialog = page.get_by_role("dialog")
    selection = dialog.get_by_placeholder("No matching partitions")
    selection.fill(f"[{first}...{last}]")
    selection.press("Enter")
    expect(dialog.get_by_text("3 partitions")).to_be_visible()
    screenshot(page, "backfill-launch")
    dialog.get_by_role("button", name="Launch backfill").click()

    created = page.get_by_text("Created backfill")
    expect(created).to_be_visible()
    backfill_id = created.inner_text().split()[-1]
    page.locator(f'a[href="/runs/b/{backfill_id}"]').click()  # the toast's "View"
    expect(page).to_have_url(f"{stack.webserver_url}/runs/b/{backfill_id}")

    def completed() -> dict | None:
        backfill = stack.graphql(BACKFILL_QUERY, id=backfill_id)["partitionBackfillOrError"]
        return backfill if backfill["status"].startswith("COMPLETED") else None

    backfill = stack.wait_for(f"backfill {backfill_id} to complete", completed, timeout=150)
    assert backfill["status"] == "COMPLETED_SUCCESS", stack.explain(str(backfill))
    # A single-run backfill policy: the whole range is one run, tagged with its integration by
    # the run coordinator although the UI gave it no such tag.
    (run,) = backfill["runs"]
    tags = {tag["key"]: tag["value"] for tag in run["tags"]}
    assert run["status"] == "SUCCESS"
    assert tags["integration"] == MANUAL
    assert tags["master_database"] == MASTER_DATABASES[MANUAL]
    assert tags["dagster/asset_partition_range_start"] == first
    assert tags["dagster/asset_partition_range_end"] == last

    page.reload()
    expect(page.get_by_text("100% completed")).to_have_count(3)  # one line per asset
    expect(page.get_by_text("Succeeded", exact=True).first).to_be_visible()
    screenshot(page, "backfill-completed")

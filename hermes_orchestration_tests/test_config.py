"""The integrations file: what it accepts, what it builds, and every message it gives back.

Broken files live in ``bad_integrations/``; each starts with the exact lines it must produce
(``# expect: ...``), so a new case is a new file.
"""

from __future__ import annotations

import json
import pickle
import re
import warnings
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, available_timezones

import dagster as dg
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hermes_orchestration.config import (
    INTEGRATIONS_FILE_ENV,
    NAME_PATTERN,
    ConfigProblem,
    FreshnessConfig,
    Granularity,
    Integration,
    IntegrationsConfig,
    IntegrationsFileError,
    PartitionsKey,
    _FastLoader,
    _Loader,
    _read_yaml_with,
    integrations_file_path,
    json_schema,
    load_integrations,
    parse_integrations,
)

PROJECT_ROOT = Path(__file__).resolve().parent.parent
SHIPPED_FILE = PROJECT_ROOT / "integrations.yaml"
CORPUS = Path(__file__).resolve().parent / "bad_integrations"
EXPECT = "# expect: "

MINIMAL = """\
integrations:
  - name: tienda_sur
    site_url: https://tienda-sur.example.cl
    app_token_env: HERMES_TOKEN_TIENDA_SUR
    master_database: clientes_chile
    partitions: {start: 2024-01-01}
"""


def problems_of(text: str) -> list[str]:
    """The lines of the error that ``text`` raises."""
    with pytest.raises(IntegrationsFileError) as caught:
        parse_integrations(text)
    return str(caught.value).splitlines()


def only(text: str) -> Integration:
    (integration,) = parse_integrations(text).integrations
    return integration


# --- The corpus of broken files ---------------------------------------------------------------


def corpus_files() -> list[Path]:
    return sorted(CORPUS.glob("*.yaml"))


def test_the_corpus_covers_at_least_forty_broken_files() -> None:
    assert len(corpus_files()) >= 40


@pytest.mark.parametrize("path", corpus_files(), ids=lambda path: path.stem)
def test_each_broken_file_gives_exactly_its_expected_messages(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    expected = [line.removeprefix(EXPECT) for line in text.splitlines() if line.startswith(EXPECT)]
    assert expected, f"{path.name} states no '# expect:' line"

    with pytest.raises(IntegrationsFileError) as caught:
        parse_integrations(text)

    assert [str(problem) for problem in caught.value.problems] == expected
    assert str(caught.value) == "\n".join(expected)


# --- Secrets are never echoed -----------------------------------------------------------------

TOKEN = "hms_live_4f9a2b7c1d8e3f6a5b0c9d2e7f1a"


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("app_token", TOKEN),
        ("api_token", TOKEN),
        ("app_token_env", TOKEN),
        ("site_url", TOKEN),
        ("display_name", ["x", TOKEN]),
        ("timezone", TOKEN),
        ("page_size", TOKEN),
        (TOKEN, "value"),
    ],
)
def test_a_secret_anywhere_never_appears_in_the_error(key: str, value: object) -> None:
    kept = [
        line for line in MINIMAL.splitlines(keepends=True) if not line.startswith(f"    {key}:")
    ]
    text = "".join(kept) + f"    {key}: {json.dumps(value)}\n"

    with pytest.raises(IntegrationsFileError) as caught:
        parse_integrations(text)

    for shown in (str(caught.value), repr(caught.value), repr(caught.value.problems)):
        assert TOKEN not in shown
        assert "4f9a2b7c" not in shown


def test_credentials_in_the_site_url_are_never_echoed() -> None:
    text = MINIMAL.replace("https://tienda-sur", "https://admin:Sup3rS3cret@tienda-sur")
    (message,) = problems_of(text)
    assert "Sup3rS3cret" not in message
    assert "admin" not in message
    assert "must not contain a user name or password" in message


# --- Every problem at once ------------------------------------------------------------------


def test_every_problem_is_reported_at_once() -> None:
    text = """\
integrations:
  - name: tienda_centro
    site_url: http://tienda-centro.example.cl
    app_token_env: HERMES_TOKEN_TIENDA_CENTRO
    master_database: clientes_chile
    partitions: {start: 2024-01-01}
    schedule: every hour
  - name: tienda_sur
    site_url: https://tienda-sur.example.cl
    app_token_env: HERMES_TOKEN_TIENDA_SUR
    master_database: clientes_chile
    partitions: {granularity: weekly, start: 2024-01-01}
    page_size: 5000
    timezone: America/Santigo
"""
    assert problems_of(text) == [
        "integrations.yaml:3: integration 'tienda_centro': site_url: plain http is allowed only "
        "for localhost/127.0.0.1/[::1]; use https",
        "integrations.yaml:7: integration 'tienda_centro': schedule: 'every hour' is not a cron "
        'expression (expected 5 fields, e.g. "*/30 * * * *")',
        "integrations.yaml:12: integration 'tienda_sur': partitions.granularity: 'weekly' must be "
        "daily or hourly",
        "integrations.yaml:13: integration 'tienda_sur': page_size: 5000 must be between 1 and "
        "1000",
        "integrations.yaml:14: integration 'tienda_sur': timezone: 'America/Santigo' is not an "
        "IANA time zone (did you mean 'America/Santiago'?)",
    ]


def test_problems_carry_file_line_and_integration() -> None:
    with pytest.raises(IntegrationsFileError) as caught:
        parse_integrations(MINIMAL + "    page_size: 0\n", filename="conf/sites.yaml")
    assert caught.value.problems == (
        ConfigProblem(
            file="conf/sites.yaml",
            line=7,
            integration="tienda_sur",
            message="page_size: 0 must be between 1 and 1000",
        ),
    )


@pytest.mark.parametrize(
    ("problem", "shown"),
    [
        (ConfigProblem("f.yaml", 3, "tienda", "boom"), "f.yaml:3: integration 'tienda': boom"),
        (ConfigProblem("f.yaml", 3, "#2", "boom"), "f.yaml:3: integration #2: boom"),
        (ConfigProblem("f.yaml", 3, None, "boom"), "f.yaml:3: boom"),
        (ConfigProblem("f.yaml", None, None, "boom"), "f.yaml: boom"),
    ],
)
def test_a_problem_reads_as_file_line_integration_message(
    problem: ConfigProblem, shown: str
) -> None:
    assert str(problem) == shown


def test_the_error_survives_pickling() -> None:
    error = IntegrationsFileError([ConfigProblem("f.yaml", 1, None, "boom")])
    copy = pickle.loads(pickle.dumps(error))
    assert copy.problems == error.problems
    assert str(copy) == "f.yaml:1: boom"


# --- The shipped file -----------------------------------------------------------------------


def test_the_shipped_file_declares_two_demo_sites_feeding_one_database() -> None:
    config = load_integrations(SHIPPED_FILE)

    assert config.names == ("tienda_centro", "tienda_sur")
    centro, sur = config.integrations
    assert {centro.app_token_env, sur.app_token_env} == {
        "HERMES_TOKEN_TIENDA_CENTRO",
        "HERMES_TOKEN_TIENDA_SUR",
    }
    assert centro.site_url == sur.site_url == "http://127.0.0.1:8400"
    assert centro.schedule == "*/30 * * * *"
    assert sur.schedule == "0 * * * *"
    assert config.by_master_database() == {"clientes_chile": (centro, sur)}
    for integration in config.integrations:
        assert integration.timezone == "America/Santiago"
        assert integration.partitions.granularity is Granularity.DAILY
        assert integration.partitions.start == datetime(2026, 11, 1)
        assert integration.enabled
    # Same partitions: the two sites can share jobs.
    assert centro.partitions_key == sur.partitions_key


def test_the_shipped_file_teaches_every_field_in_a_comment() -> None:
    text = SHIPPED_FILE.read_text(encoding="utf-8")
    for name in Integration.model_fields:
        assert re.search(rf"^\s*(- )?{name}:", text, re.MULTILINE), f"{name} is not shown"
    assert sum(line.lstrip().startswith("#") for line in text.splitlines()) >= 30


def test_by_default_the_file_is_the_one_at_the_project_root(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(INTEGRATIONS_FILE_ENV, raising=False)
    assert integrations_file_path() == SHIPPED_FILE
    assert load_integrations().names == ("tienda_centro", "tienda_sur")


def test_the_environment_variable_points_at_another_file(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    other = tmp_path / "sites.yaml"
    other.write_text(MINIMAL)
    monkeypatch.setenv(INTEGRATIONS_FILE_ENV, str(other))

    assert integrations_file_path() == other
    config = load_integrations()
    assert config.names == ("tienda_sur",)
    assert config.path == str(other)


def test_the_file_named_by_the_environment_is_shown_as_given(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    Path("sites.yaml").write_text(MINIMAL + "    page_size: 0\n")
    monkeypatch.setenv(INTEGRATIONS_FILE_ENV, "sites.yaml")
    with pytest.raises(IntegrationsFileError) as caught:
        load_integrations()
    assert str(caught.value).startswith("sites.yaml:7: integration 'tienda_sur': page_size")


def test_a_missing_file_says_what_to_do(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(IntegrationsFileError) as caught:
        load_integrations(missing)
    assert str(caught.value) == (
        f"{missing}: file not found; create it (the repository ships an example) or set "
        f"{INTEGRATIONS_FILE_ENV} to its path"
    )


def test_a_directory_or_non_utf8_file_is_refused_clearly(tmp_path: Path) -> None:
    with pytest.raises(IntegrationsFileError, match="is a directory, not a file"):
        load_integrations(tmp_path)
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes(MINIMAL.encode() + "    display_name: Peñalolén\n".encode("latin-1"))
    with pytest.raises(IntegrationsFileError) as caught:
        load_integrations(latin1)
    assert str(caught.value) == f"{latin1}:7: is not UTF-8 text; save it as UTF-8"


def test_a_utf8_byte_order_mark_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "bom.yaml"
    path.write_bytes(b"\xef\xbb\xbf" + MINIMAL.encode())
    assert load_integrations(path).names == ("tienda_sur",)


# --- What a valid file builds ---------------------------------------------------------------


def test_every_optional_field_has_its_documented_default() -> None:
    integration = only(MINIMAL)
    assert integration.display_name == "tienda_sur"
    assert integration.enabled is True
    assert integration.timezone == "UTC"
    assert integration.schedule == "0 * * * *"
    assert integration.partitions.granularity is Granularity.DAILY
    assert integration.page_size == 500
    assert integration.max_requests_per_second == 5
    assert integration.default_country == "CL"
    assert integration.max_reject_ratio == 0.05
    assert integration.auto_pause_after_failures == 3
    assert integration.freshness == FreshnessConfig(
        warn_after=timedelta(hours=2), fail_after=timedelta(hours=6)
    )
    assert integration.max_concurrent_runs == 1


def test_defaults_apply_and_each_integration_may_override_them() -> None:
    config = parse_integrations("""\
defaults:
  timezone: America/Santiago
  page_size: 200
  partitions: {granularity: hourly, start: 2024-01-01 00:00}
  freshness: {warn_after: 30m}
integrations:
  - name: tienda_centro
    site_url: https://tienda-centro.example.cl
    app_token_env: HERMES_TOKEN_TIENDA_CENTRO
    master_database: clientes_chile
  - name: tienda_sur
    site_url: https://tienda-sur.example.cl
    app_token_env: HERMES_TOKEN_TIENDA_SUR
    master_database: clientes_chile
    timezone: UTC
    page_size: 1000
    partitions: {start: 2024-06-01 10:00}
    freshness: {fail_after: 1h}
""")
    centro, sur = config.integrations
    assert (centro.timezone, centro.page_size) == ("America/Santiago", 200)
    assert (sur.timezone, sur.page_size) == ("UTC", 1000)
    # Mappings merge key by key: granularity comes from the defaults, start from the entry.
    assert centro.partitions.granularity is sur.partitions.granularity is Granularity.HOURLY
    assert centro.partitions.start == datetime(2024, 1, 1, 0, 0)
    assert sur.partitions.start == datetime(2024, 6, 1, 10, 0)
    assert centro.freshness.warn_after == sur.freshness.warn_after == timedelta(minutes=30)
    assert centro.freshness.fail_after == timedelta(hours=6)
    assert sur.freshness.fail_after == timedelta(hours=1)


def test_values_are_normalized() -> None:
    integration = only(
        MINIMAL.replace("https://tienda-sur.example.cl", "HTTPS://Tienda-Sur.Example.CL:8443/")
        + "    default_country: pe\n"
        + '    schedule: "  */15   * * * *  "\n'
        + "    display_name: '  Integración Hermes + icomm  '\n"
    )
    assert integration.site_url == "https://tienda-sur.example.cl:8443"
    assert integration.default_country == "PE"
    assert integration.schedule == "*/15 * * * *"
    assert integration.display_name == "Integración Hermes + icomm"


@pytest.mark.parametrize(
    "url",
    ["http://localhost:8400", "http://127.0.0.1:8400/hermes", "http://[::1]:8400", "https://x.cl"],
)
def test_plain_http_is_fine_on_loopback(url: str) -> None:
    assert only(MINIMAL.replace("https://tienda-sur.example.cl", url)).site_url == url


def test_properties_used_to_build_definitions() -> None:
    integration = only(
        MINIMAL.replace("{start: 2024-01-01}", "{granularity: hourly, start: 2026-11-01 10:00}")
        + "    timezone: America/Santiago\n"
    )
    assert integration.zone == ZoneInfo("America/Santiago")
    assert integration.api_url == "https://tienda-sur.example.cl/api/v1"
    assert integration.group_name == "tienda_sur"
    assert integration.asset_prefix == ["hermes", "tienda_sur"]
    assert integration.partitions_key == PartitionsKey(
        Granularity.HOURLY, datetime(2026, 11, 1, 10), "America/Santiago"
    )
    # November is summer time in Chile (UTC-3).
    assert integration.partitions_start.isoformat() == "2026-11-01T10:00:00-03:00"
    hash(integration.partitions_key)


def test_durations_and_partition_starts_in_every_accepted_form() -> None:
    integration = only(
        MINIMAL.replace("{start: 2024-01-01}", "{granularity: hourly, start: '2024-01-01T07:00'}")
        + "    freshness: {warn_after: 1h30m, fail_after: 1d}\n"
    )
    assert integration.partitions.start == datetime(2024, 1, 1, 7)
    assert integration.freshness.warn_after == timedelta(minutes=90)
    assert integration.freshness.fail_after == timedelta(days=1)
    dumped = integration.model_dump(mode="json")
    assert dumped["freshness"] == {"warn_after": "1h30m", "fail_after": "1d"}
    assert dumped["partitions"] == {"granularity": "hourly", "start": "2024-01-01 07:00"}


def test_yaml_conveniences_work() -> None:
    config = parse_integrations("""\
integrations:
  - &centro
    name: tienda_centro
    site_url: https://tienda.example.cl
    app_token_env: HERMES_TOKEN_TIENDA_CENTRO
    master_database: clientes_chile
    partitions: {start: 2024-01-01}
    enabled: yes
  - <<: *centro
    name: tienda_sur
    app_token_env: HERMES_TOKEN_TIENDA_SUR
    master_database: clientes_sur
    enabled: off
""")
    centro, sur = config.integrations
    assert (centro.enabled, sur.enabled) == (True, False)
    # The merged entry keeps what it does not override.
    assert sur.site_url == centro.site_url == "https://tienda.example.cl"
    assert (centro.master_database, sur.master_database) == ("clientes_chile", "clientes_sur")
    assert config.enabled == (centro,)
    assert set(config.by_master_database()) == {"clientes_chile", "clientes_sur"}


def yaml_files() -> list[Path]:
    return [*corpus_files(), PROJECT_ROOT / "integrations.yaml"]


@pytest.mark.parametrize("path", yaml_files(), ids=lambda path: path.stem)
def test_libyaml_reads_every_file_exactly_as_the_pure_python_parser_does(path: Path) -> None:
    # Files are parsed by libyaml when PyYAML has it; whatever it accepts must come out the same
    # (values and lines) as from the pure-Python parser, which also words the syntax errors.
    assert _FastLoader is not None, "PyYAML is installed without libyaml"
    text = path.read_text(encoding="utf-8")
    fast = _read_yaml_with(_FastLoader(text), text)
    if not fast[2]:
        assert _read_yaml_with(_Loader(text), text) == fast


@pytest.mark.parametrize("text", ["integrations: []\n", "integrations:\n", "integrations: []\n# x"])
def test_an_empty_list_of_integrations_is_allowed(text: str) -> None:
    config = parse_integrations(text)
    assert config.integrations == ()
    assert config.by_master_database() == {}


def test_get_names_the_known_integrations_when_one_is_missing() -> None:
    config = parse_integrations(MINIMAL)
    assert config.get("tienda_sur").name == "tienda_sur"
    with pytest.raises(
        KeyError,
        match=r"no integration named 'tienda_norte' in integrations\.yaml "
        r"\(known: tienda_sur\)",
    ):
        config.get("tienda_norte")


def test_a_file_narrowed_to_one_integration_keeps_it_and_its_path() -> None:
    shipped = load_integrations(PROJECT_ROOT / "integrations.yaml")
    narrowed = shipped.only("tienda_sur")
    assert narrowed.integrations == (shipped.get("tienda_sur"),)
    assert narrowed.path == shipped.path
    assert len(shipped.integrations) == 2  # the original is untouched
    with pytest.raises(KeyError, match="no integration named 'tienda_norte'"):
        shipped.only("tienda_norte")


def test_models_are_frozen() -> None:
    integration = only(MINIMAL)
    with pytest.raises(ValueError, match="frozen"):
        integration.page_size = 10  # type: ignore[misc]
    assert isinstance(parse_integrations(MINIMAL), IntegrationsConfig)


# --- JSON Schema ----------------------------------------------------------------------------


def check_schema(schema: dict[str, Any], value: Any, path: str = "$") -> list[str]:
    """A small JSON Schema checker: the keywords json_schema() uses, nothing more."""
    errors: list[str] = []
    kinds = schema.get("type")
    if kinds is not None:
        names = {
            "object": dict,
            "array": list,
            "string": str,
            "boolean": bool,
            "null": type(None),
            "integer": int,
            "number": (int, float),
        }
        allowed = [kinds] if isinstance(kinds, str) else kinds
        # JSON has no booleans among its numbers.
        matches = any(
            isinstance(value, names[kind])
            and not (kind in ("integer", "number") and isinstance(value, bool))
            for kind in allowed
        )
        if not matches:
            return [f"{path}: {value!r} is not {allowed}"]
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{path}: {value!r} not in {schema['enum']}")
    if isinstance(value, str):
        if "pattern" in schema and not re.search(schema["pattern"], value):
            errors.append(f"{path}: {value!r} does not match {schema['pattern']}")
        if len(value) < schema.get("minLength", 0):
            errors.append(f"{path}: too short")
    if isinstance(value, int | float) and not isinstance(value, bool):
        if "minimum" in schema and value < schema["minimum"]:
            errors.append(f"{path}: below minimum")
        if "maximum" in schema and value > schema["maximum"]:
            errors.append(f"{path}: above maximum")
        if "exclusiveMinimum" in schema and value <= schema["exclusiveMinimum"]:
            errors.append(f"{path}: not above exclusiveMinimum")
    if isinstance(value, dict):
        properties = schema.get("properties", {})
        errors += [
            f"{path}: missing {key}" for key in schema.get("required", []) if key not in value
        ]
        for key, item in value.items():
            if key in properties:
                errors += check_schema(properties[key], item, f"{path}.{key}")
            elif schema.get("additionalProperties") is False:
                errors.append(f"{path}: unexpected {key}")
    if isinstance(value, list) and "items" in schema:
        for index, item in enumerate(value):
            errors += check_schema(schema["items"], item, f"{path}[{index}]")
    return errors


def as_editor_sees(text: str) -> Any:
    """The document as JSON data: dates stay text, as yaml-language-server reads them."""
    return json.loads(json.dumps(yaml.safe_load(text), default=str))


def test_the_json_schema_describes_every_field() -> None:
    schema = json_schema()
    json.dumps(schema)  # plain JSON, no $ref left to resolve
    assert "$ref" not in json.dumps(schema)
    assert schema["required"] == ["integrations"]
    integration = schema["properties"]["integrations"]["items"]
    assert set(integration["properties"]) == set(Integration.model_fields)
    # Every other required field may come from `defaults`.
    assert integration["required"] == ["name"]
    assert (
        "site_url, app_token_env, master_database and partitions.start"
        in (integration["description"])
    )
    for name, field in integration["properties"].items():
        assert field.get("description"), f"{name} has no description"
    assert integration["properties"]["name"]["pattern"] == f"^{NAME_PATTERN}$"
    assert integration["properties"]["master_database"]["pattern"] == f"^{NAME_PATTERN}$"
    assert integration["properties"]["page_size"]["maximum"] == 1000
    defaults = schema["properties"]["defaults"]["properties"]
    assert set(defaults) == set(Integration.model_fields) - {"name"}


def test_every_default_in_the_json_schema_is_valid_by_it() -> None:
    schema = json_schema()
    integration = schema["properties"]["integrations"]["items"]
    fields = [*integration["properties"].items()]
    fields += [*integration["properties"]["partitions"]["properties"].items()]
    fields += [*integration["properties"]["freshness"]["properties"].items()]
    defaults = {name: field["default"] for name, field in fields if "default" in field}
    assert defaults["warn_after"] == "2h"
    assert defaults["schedule"] == "0 * * * *"
    for name, field in fields:
        if "default" in field:
            assert check_schema(field, field["default"]) == [], name


def test_the_shipped_file_validates_against_the_json_schema() -> None:
    assert check_schema(json_schema(), as_editor_sees(SHIPPED_FILE.read_text())) == []


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("partitions: {start: 2024-01-01}", "partitions: {start: 2024-01-01, every: 1d}"),
        ("name: tienda_sur", "name: Tienda-Sur"),
        ("app_token_env: HERMES_TOKEN_TIENDA_SUR", "app_token_env: hms_4f9a2b7c1d8e"),
        ("master_database: clientes_chile", "master_database: 7"),
        ("site_url:", "page_size: 5000\n    site_url:"),
        ("site_url:", "enabled: 'maybe'\n    site_url:"),
        ("site_url:", "scheduel: '* * * * *'\n    site_url:"),
    ],
)
def test_the_json_schema_flags_what_the_loader_refuses(old: str, new: str) -> None:
    text = MINIMAL.replace(old, new)
    assert problems_of(text)
    assert check_schema(json_schema(), as_editor_sees(text)) != []


# --- Properties -----------------------------------------------------------------------------

ZONES = sorted(available_timezones())
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def assert_parses_or_explains(text: str) -> None:
    try:
        config = parse_integrations(text)
    except IntegrationsFileError as error:
        assert str(error).strip()
        assert all(problem.message for problem in error.problems)
    else:
        assert isinstance(config, IntegrationsConfig)


YAML_PIECES = st.sampled_from([*":-[]{}#&*!|>'\",?%@ \n\t\\<=", "\n  ", "\n    - ", "<<: "])


def yaml_text(max_pieces: int) -> st.SearchStrategy[str]:
    """Text rich in YAML punctuation and indentation, with any other character mixed in."""
    return st.lists(YAML_PIECES | st.characters(), max_size=max_pieces).map("".join)


@FUZZ
@given(yaml_text(200))
def test_any_text_either_parses_or_is_explained(text: str) -> None:
    assert_parses_or_explains(text)


@FUZZ
@given(st.data())
def test_any_mutation_of_the_shipped_file_either_parses_or_is_explained(
    data: st.DataObject,
) -> None:
    text = SHIPPED_FILE.read_text()
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(text)))
        cut = data.draw(st.integers(0, 12))
        insert = data.draw(yaml_text(4))
        text = text[:at] + insert + text[at + cut :]
    assert_parses_or_explains(text)


FIELD_NAMES = [*Integration.model_fields, "partitions", "app_token", "granularity", "start"]
scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**30), max_value=10**30)
    | st.floats()
    | st.text(max_size=40)
    | st.dates()
    | st.datetimes()
    | st.sampled_from(["*/30 * * * *", "America/Santiago", "2h", "daily", "hourly", "CL"])
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.sampled_from(FIELD_NAMES) | st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
entries = st.dictionaries(st.sampled_from(FIELD_NAMES) | st.text(max_size=8), values, max_size=8)
documents = st.fixed_dictionaries(
    {},
    optional={
        "defaults": entries | values,
        "integrations": st.lists(entries | values, max_size=4) | values,
        "extra": values,
    },
)


@FUZZ
@given(documents)
def test_any_structured_document_either_parses_or_is_explained(document: dict[str, Any]) -> None:
    assert_parses_or_explains(yaml.safe_dump(document, allow_unicode=True))


@FUZZ
@given(
    name=st.from_regex(NAME_PATTERN, fullmatch=True),
    start=st.dates(min_value=date(1970, 1, 1), max_value=date(2100, 12, 31)),
    page_size=st.integers(1, 1000),
    timezone=st.sampled_from(["UTC", "America/Santiago", "Europe/Madrid", "Asia/Kolkata"]),
    schedule=st.sampled_from(["*/30 * * * *", "0 * * * *", "15 3 * * 1-5", "0 0 29 2 *"]),
)
def test_any_valid_entry_is_accepted_as_written(
    name: str, start: date, page_size: int, timezone: str, schedule: str
) -> None:
    document = {
        "integrations": [
            {
                "name": name,
                "site_url": "https://tienda.example.cl",
                "app_token_env": "HERMES_TOKEN",
                "master_database": name,
                "timezone": timezone,
                "schedule": schedule,
                "page_size": page_size,
                "partitions": {"start": start},
            }
        ]
    }
    integration = only(yaml.safe_dump(document))
    assert (integration.name, integration.master_database) == (name, name)
    assert integration.partitions.start == datetime(start.year, start.month, start.day)
    assert (integration.page_size, integration.timezone) == (page_size, timezone)
    assert integration.schedule == schedule


CRON_FIELDS = st.text(alphabet="0123456789*/,-?#LW", min_size=1, max_size=5) | st.sampled_from(
    ["*", "*/15", "*/90", "1-5/9", "mon-fri", "jan", "L", "1W", "1#2", "30", "31", "2", "7"]
)


@FUZZ
@given(fields=st.lists(CRON_FIELDS, min_size=5, max_size=5), timezone=st.sampled_from(ZONES))
def test_every_schedule_and_timezone_accepted_is_one_dagster_accepts(
    fields: list[str], timezone: str
) -> None:
    expression = " ".join(fields)
    try:
        integration = only(
            MINIMAL + f"    schedule: {json.dumps(expression)}\n    timezone: {timezone}\n"
        )
    except IntegrationsFileError:
        return
    with warnings.catch_warnings():
        # Dagster refuses some expressions and warns about others ("*/90 * * * *" runs hourly).
        warnings.simplefilter("error")
        dg.ScheduleDefinition(
            name="schedule",
            cron_schedule=integration.schedule,
            job_name="job",
            execution_timezone=integration.timezone,
        )


def test_names_outside_the_pattern_are_refused() -> None:
    for bad in ["", "1tienda", "tienda-sur", "Tienda", "t" * 64, "tienda sur", "ñandú"]:
        text = MINIMAL.replace("name: tienda_sur", f"name: {json.dumps(bad)}")
        assert any("name:" in line and "must match" in line for line in problems_of(text)), bad

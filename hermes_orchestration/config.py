"""The schema and loader of ``integrations.yaml``, the file people edit to connect a Hermes site.

Parse, validate, then build, in three separate steps:

1. YAML text -> plain values, keeping the line of every key (PyYAML would silently keep the last
   of two duplicate keys, so duplicates are caught here);
2. plain values -> frozen pydantic models that refuse unknown keys;
3. the models are all the rest of the project sees.

Every problem in the file is collected and reported at once, each with its file, line and
integration, so that one review of a pull request shows everything that is wrong with it. Values
that may be secrets are never echoed back in a message.
"""

from __future__ import annotations

import difflib
import itertools
import logging
import math
import os
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta
from enum import StrEnum
from functools import cache
from pathlib import Path
from typing import Annotated, Any, NamedTuple, NoReturn, Self
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, available_timezones

import yaml
from croniter import croniter
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    ValidationError,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails, PydanticCustomError
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode
from yaml.reader import ReaderError

from hermes_orchestration.collection import collection_paused

__all__ = [
    "DEFAULT_FILE_NAME",
    "INTEGRATIONS_FILE_ENV",
    "NAME_PATTERN",
    "ConfigProblem",
    "FreshnessConfig",
    "Granularity",
    "Integration",
    "IntegrationsConfig",
    "IntegrationsFileError",
    "PartitionsConfig",
    "PartitionsKey",
    "integrations_file_path",
    "json_schema",
    "load_integrations",
    "parse_integrations",
]

logger = logging.getLogger(__name__)

INTEGRATIONS_FILE_ENV = "HERMES_INTEGRATIONS_FILE"
DEFAULT_FILE_NAME = "integrations.yaml"
# Names end up in asset keys, job names and SQL identifiers, hence the narrow alphabet and the
# 63-character limit (PostgreSQL's identifier length).
NAME_PATTERN = "[a-z][a-z0-9_]{0,62}"
ENV_NAME_PATTERN = "[A-Z_][A-Z0-9_]{0,127}"
API_PATH = "/api/v1"  # the contract's server URL is "{site_url}/api/v1"
LOCAL_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})

# Where a value sits in the document: keys and list positions, e.g. ("integrations", 2, "name").
_KeyPath = tuple[str | int, ...]

_ERROR_TYPE = "hermes_config"
_URL_EXAMPLE = "e.g. https://tienda.example.cl"
_CRON_EXAMPLE = '"*/30 * * * *"'
_START_EXAMPLE = "a date like 2024-01-01, or a time like 2024-01-01 10:00 for hourly partitions"
_MAPPING_EXAMPLES = {
    "partitions": "{granularity: daily, start: 2024-01-01}",
    "freshness": "{warn_after: 2h, fail_after: 6h}",
}
_MISSING_HINTS = {
    ("site_url",): f" (the site's base URL, {_URL_EXAMPLE})",
    ("app_token_env",): " (the NAME of the environment variable that holds the App Token)",
    ("master_database",): " (the icomm master database, e.g. clientes_chile)",
    ("partitions",): " (e.g. partitions: {granularity: daily, start: 2024-01-01})",
    ("partitions", "start"): " (e.g. start: 2024-01-01)",
}


# --- Showing values in messages --------------------------------------------------------------

_TOKEN_CHARS = re.compile(r"[A-Za-z0-9._~+/=-]+")


def _looks_secret(text: str) -> bool:
    """Whether ``text`` looks like a credential: long, no spaces, letters and digits interleaved."""
    if len(text) < 20 or not _TOKEN_CHARS.fullmatch(text):
        return False
    switches = sum(
        1
        for left, right in itertools.pairwise(text)
        if left.isalnum() and right.isalnum() and left.isdigit() != right.isdigit()
    )
    return switches >= 4


def _show(value: object) -> str:
    """A short, safe rendering of a value for an error message."""
    if isinstance(value, str):
        if _looks_secret(value):
            return f"a {len(value)}-character value (hidden: it looks like a secret)"
        return repr(value if len(value) <= 60 else value[:57] + "...")
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value) if value.bit_length() <= 64 else "a very large number"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, datetime):
        return value.isoformat(sep=" ")
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list | tuple):
        return "a list"
    return f"a {type(value).__name__} value"


def _fail(message: str) -> NoReturn:
    # The message goes through the error's context so that braces in it are never formatted.
    raise PydanticCustomError(_ERROR_TYPE, "{message}", {"message": message})


class Granularity(StrEnum):
    """How a partition is cut: one per day or one per hour, in the integration's timezone."""

    DAILY = "daily"
    HOURLY = "hourly"


_GRANULARITIES = frozenset(granularity.value for granularity in Granularity)


# --- Field validators: each returns the clean value or fails with a precise message ----------


def _text(value: object) -> str:
    if not isinstance(value, str):
        hint = "; put it in quotes" if isinstance(value, int | float | date) else ""
        _fail(f"{_show(value)} is not text{hint}")
    return value


def _name(value: object) -> str:
    text = _text(value)
    if not re.fullmatch(NAME_PATTERN, text):
        _fail(
            f"{_show(text)} must match {NAME_PATTERN} (lowercase letters, digits and _; "
            "it becomes part of asset keys and SQL-safe names)"
        )
    return text


def _database(value: object) -> str:
    text = _text(value)
    if not re.fullmatch(NAME_PATTERN, text):
        _fail(
            f"{_show(text)} must match {NAME_PATTERN} (lowercase letters, digits and _, "
            "like clientes_chile; it names the icomm master database)"
        )
    return text


def _display_name(value: object) -> str:
    text = _text(value).strip()
    if not text:
        _fail("is empty; leave the line out to show the integration's name instead")
    if not text.isprintable():
        _fail("must be a single line of printable text")
    if len(text) > 200:
        _fail(f"is {len(text)} characters long; keep it to 200")
    return text


def _site_url(value: object) -> str:
    text = _text(value).strip()
    if "://" not in text or any(char.isspace() for char in text):
        _fail(f"{_show(text)} is not a URL ({_URL_EXAMPLE})")
    try:
        parts = urlsplit(text)
        host = parts.hostname
        parts.port  # noqa: B018 - raises ValueError on a port that is not a number in range
    except ValueError:
        _fail(f"{_show(text)} is not a valid URL ({_URL_EXAMPLE})")
    if parts.username is not None or parts.password is not None:
        # Never echo the URL: the user name or password in it is a credential.
        _fail(
            "must not contain a user name or password; put the App Token in an environment "
            "variable and name that variable in app_token_env"
        )
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        _fail(f"must start with https:// ({_URL_EXAMPLE})")
    if not host or not re.fullmatch(r"[\w.-]+|[0-9a-f:.]+", host):
        _fail(f"{_show(text)} has no valid host name ({_URL_EXAMPLE})")
    if parts.query or parts.fragment or text.endswith(("?", "#")):
        _fail(
            "must not have a query (?...) or fragment (#...); "
            f"give the site's base URL, {_URL_EXAMPLE}"
        )
    if scheme == "http" and host not in LOCAL_HOSTS:
        _fail("plain http is allowed only for localhost/127.0.0.1/[::1]; use https")
    path = parts.path.rstrip("/")
    if path.endswith(API_PATH):
        _fail(f"give the site's base URL without {API_PATH} (it is added when calling the API)")
    return f"{scheme}://{parts.netloc.lower()}{path}"


def _env_name(value: object) -> str:
    if isinstance(value, str) and re.fullmatch(ENV_NAME_PATTERN, value):
        return value
    # Anything else here is often the App Token itself, pasted in by mistake: never echo it.
    size = f"{len(value)} characters, hidden" if isinstance(value, str) else "hidden"
    _fail(
        f"the value given ({size}) does not look like an environment variable NAME "
        "(uppercase letters, digits and _, e.g. HERMES_TOKEN_TIENDA_CENTRO); put the App Token "
        "in an environment variable and name it here"
    )


@cache
def _zone_names() -> frozenset[str]:
    return frozenset(available_timezones())


def _timezone(value: object) -> str:
    text = _text(value)
    if text not in _zone_names():
        close = difflib.get_close_matches(text, _zone_names(), n=1)
        hint = f"did you mean {close[0]!r}?" if close else "e.g. America/Santiago or UTC"
        _fail(f"{_show(text)} is not an IANA time zone ({hint})")
    return text


_CRON_FIELD = re.compile(r"[0-9A-Za-z*/,?#-]{1,64}")
_MONTH_DAYS = (31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)


def _cron_days(expression: str) -> list[list[Any]] | None:
    """croniter's expansion of a 5-field expression, or None when croniter refuses it."""
    try:
        expanded = croniter.expand(expression)[0]
    except (ValueError, TypeError, KeyError, IndexError, OverflowError):
        # CroniterError is a ValueError; the others guard against inputs croniter never expected.
        return None
    return expanded if len(expanded) == 5 else None


_CRON_RANGES = (
    ("minute", 59),
    ("hour", 23),
    ("day-of-month", 31),
    ("month", 12),
    ("day-of-week", 7),
)


def _oversized_step(fields: list[str]) -> tuple[str, int, int] | None:
    """The first step larger than its range, e.g. "*/90" minutes (Dagster warns and runs hourly)."""
    for (unit, field_top), field_text in zip(_CRON_RANGES, fields, strict=True):
        for part in field_text.split(","):
            base, slash, step = part.partition("/")
            if not slash or not step.isdigit():
                continue
            upper = base.partition("-")[2]
            top = int(upper) if upper.isdigit() else field_top
            if int(step) > top:
                return unit, int(step), top
    return None


def _cron(value: object) -> str:
    text = _text(value)
    fields = text.split()
    if len(fields) != 5:
        _fail(f"{_show(text)} is not a cron expression (expected 5 fields, e.g. {_CRON_EXAMPLE})")
    expression = " ".join(fields)
    # Dagster's scheduler refuses "W" (nearest weekday) in the day of the month.
    readable = all(_CRON_FIELD.fullmatch(f) for f in fields) and "w" not in fields[2].lower()
    expanded = _cron_days(expression) if readable else None
    if expanded is None:
        _fail(
            f"{_show(text)} is not a valid cron expression "
            f"(minute hour day-of-month month day-of-week, e.g. {_CRON_EXAMPLE})"
        )
    oversized = _oversized_step(fields)
    if oversized is not None:
        unit, step, top = oversized
        _fail(
            f"{_show(text)} steps by {step} in the {unit} field, which only goes up to {top}: "
            "cron cannot express that interval (it would run more often than it seems)"
        )
    days, months = expanded[2], expanded[3]
    # e.g. "0 0 30 2 *": a day no chosen month has (Dagster refuses these too).
    if (
        all(isinstance(day, int) for day in days)
        and all(isinstance(month, int) and 1 <= month <= 12 for month in months)
        and min(days) > max(_MONTH_DAYS[month - 1] for month in months)
    ):
        _fail(f"{_show(text)} names day {min(days)}, which none of its months has")
    return expression


@cache
def _phone_regions() -> frozenset[str]:
    import phonenumbers  # imported on first use: a large module not every caller needs

    return frozenset(phonenumbers.SUPPORTED_REGIONS)


def _country(value: object) -> str:
    if value is False:
        _fail('false is not a country code (YAML reads an unquoted NO as false; write "NO")')
    code = _text(value).strip().upper()
    if code not in _phone_regions():
        _fail(f"{_show(value)} is not an ISO 3166-1 alpha-2 country code (e.g. CL, AR, PE)")
    return code


def _integer(minimum: int, maximum: int | None = None) -> Callable[[object], int]:
    def check(value: object) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            _fail(f"{_show(value)} is not an integer")
        if maximum is not None and not minimum <= value <= maximum:
            _fail(f"{_show(value)} must be between {minimum} and {maximum}")
        if value < minimum:
            _fail(f"{_show(value)} must be at least {minimum}")
        return value

    return check


def _number(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        percent = isinstance(value, str) and value.strip().endswith("%")
        hint = " (write a fraction, e.g. 0.05 for 5%)" if percent else ""
        _fail(f"{_show(value)} is not a number{hint}")
    try:
        number = float(value)
    except OverflowError:
        _fail(f"{_show(value)} is too large")
    if not math.isfinite(number):
        _fail(f"{_show(value)} is not a finite number")
    return number


def _rate(value: object) -> float:
    number = _number(value)
    if number <= 0:
        _fail(f"{_show(value)} must be greater than 0")
    return number


def _ratio(value: object) -> float:
    number = _number(value)
    if not 0 <= number <= 1:
        _fail(f"{_show(value)} must be between 0 and 1")
    return number


def _flag(value: object) -> bool:
    if not isinstance(value, bool):
        _fail(f"{_show(value)} is not true or false")
    return value


_DURATION_PART = re.compile(r"(\d{1,6})([smhd])")
_UNIT_SECONDS = {"d": 86400, "h": 3600, "m": 60, "s": 1}
_MAX_DURATION = timedelta(days=365)


def _duration(value: object) -> timedelta:
    if isinstance(value, timedelta):  # built in Python rather than read from the file
        seconds = int(value.total_seconds())
    else:
        compact = value.replace(" ", "") if isinstance(value, str) else ""
        if not compact or not re.fullmatch(rf"(?:{_DURATION_PART.pattern})+", compact):
            _fail(f"{_show(value)} is not a duration (a number and a unit: 30m, 2h, 1d)")
        seconds = sum(int(n) * _UNIT_SECONDS[unit] for n, unit in _DURATION_PART.findall(compact))
    if seconds <= 0:
        _fail(f"{_show(value)} must be longer than 0")
    if seconds > _MAX_DURATION.total_seconds():
        _fail(f"{_show(value)} is longer than 365 days")
    return timedelta(seconds=seconds)


def _format_duration(duration: timedelta) -> str:
    """``timedelta(hours=1, minutes=30)`` -> ``"1h30m"``, the form the file uses."""
    remaining = int(duration.total_seconds())
    parts: list[str] = []
    for unit, size in _UNIT_SECONDS.items():
        count, remaining = divmod(remaining, size)
        if count:
            parts.append(f"{count}{unit}")
    return "".join(parts) or "0s"


def _granularity(value: object) -> Granularity:
    if isinstance(value, str) and value in _GRANULARITIES:
        return Granularity(value)
    _fail(f"{_show(value)} must be daily or hourly")


def _start(value: object) -> datetime:
    if isinstance(value, datetime):
        moment = value
    elif isinstance(value, date):
        moment = datetime.combine(value, time())
    elif isinstance(value, str):
        try:
            moment = datetime.fromisoformat(value.strip())
        except ValueError:
            _fail(f"{_show(value)} is not a date ({_START_EXAMPLE})")
    else:
        _fail(f"{_show(value)} is not a date ({_START_EXAMPLE})")
    if moment.tzinfo is not None:
        _fail(
            f"{_show(value)} has a UTC offset; write the local time without one "
            "(it is read in the integration's timezone)"
        )
    if not 1970 <= moment.year <= 2100:
        _fail(f"{_show(value)} is out of range (partitions start between 1970 and 2100)")
    return moment


def _format_start(start: datetime) -> str:
    """The form the file uses: ``2024-01-01``, ``2024-01-01 10:00``."""
    if start.time() == time():
        return start.date().isoformat()
    if start.second == start.microsecond == 0:
        return start.strftime("%Y-%m-%d %H:%M")
    return start.isoformat(sep=" ")


# --- Field types: validation, JSON Schema and (for the file's own forms) serialization --------

Name = Annotated[
    str,
    BeforeValidator(_name),
    WithJsonSchema({"type": "string", "pattern": f"^{NAME_PATTERN}$"}),
]
DatabaseName = Annotated[
    str,
    BeforeValidator(_database),
    WithJsonSchema({"type": "string", "pattern": f"^{NAME_PATTERN}$"}),
]
DisplayName = Annotated[
    str, BeforeValidator(_display_name), WithJsonSchema({"type": "string", "minLength": 1})
]
SiteUrl = Annotated[
    str,
    BeforeValidator(_site_url),
    WithJsonSchema({"type": "string", "format": "uri", "pattern": "^https?://"}),
]
EnvName = Annotated[
    str,
    BeforeValidator(_env_name),
    WithJsonSchema({"type": "string", "pattern": f"^{ENV_NAME_PATTERN}$"}),
]
TimeZoneName = Annotated[
    str,
    BeforeValidator(_timezone),
    WithJsonSchema({"type": "string", "examples": ["America/Santiago", "UTC"]}),
]
CronExpression = Annotated[
    str,
    BeforeValidator(_cron),
    WithJsonSchema({"type": "string", "pattern": r"^\s*\S+(\s+\S+){4}\s*$"}),
]
CountryCode = Annotated[
    str, BeforeValidator(_country), WithJsonSchema({"type": "string", "pattern": "^[A-Za-z]{2}$"})
]
Flag = Annotated[bool, BeforeValidator(_flag), WithJsonSchema({"type": "boolean"})]
PageSize = Annotated[
    int,
    BeforeValidator(_integer(1, 1000)),
    WithJsonSchema({"type": "integer", "minimum": 1, "maximum": 1000}),
]
AtLeastOne = Annotated[
    int, BeforeValidator(_integer(1)), WithJsonSchema({"type": "integer", "minimum": 1})
]
Rate = Annotated[
    float, BeforeValidator(_rate), WithJsonSchema({"type": "number", "exclusiveMinimum": 0})
]
Ratio = Annotated[
    float,
    BeforeValidator(_ratio),
    WithJsonSchema({"type": "number", "minimum": 0, "maximum": 1}),
]
Duration = Annotated[
    timedelta,
    BeforeValidator(_duration),
    PlainSerializer(_format_duration, return_type=str, when_used="json"),
    WithJsonSchema({"type": "string", "pattern": r"^(\s*\d+\s*[smhd])+\s*$"}),
]
GranularityName = Annotated[
    Granularity,
    BeforeValidator(_granularity),
    WithJsonSchema({"type": "string", "enum": ["daily", "hourly"]}),
]
PartitionStart = Annotated[
    datetime,
    BeforeValidator(_start),
    PlainSerializer(_format_start, return_type=str, when_used="json"),
    WithJsonSchema(
        {"type": "string", "pattern": r"^\d{4}-\d{2}-\d{2}([ T]\d{2}:\d{2}(:\d{2})?)?$"}
    ),
]


# --- Models ------------------------------------------------------------------------------------


class _Strict(BaseModel):
    """Frozen, refuses unknown keys, and says so when a key is present without a value."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    @field_validator("*", mode="before")
    @classmethod
    def _present(cls, value: object, info: ValidationInfo) -> object:
        if value is None:
            field_name = info.field_name or ""
            if field_name in cls.model_fields and cls.model_fields[field_name].is_required():
                _fail("has no value (it is required)")
            _fail("has no value; give one, or leave the line out to use the default")
        return value


class PartitionsConfig(_Strict):
    """The time partitions of an integration's assets."""

    granularity: GranularityName = Field(
        default=Granularity.DAILY,
        description="daily or hourly partitions, cut in the integration's timezone.",
    )
    start: PartitionStart = Field(
        description=(
            "First partition, as local wall-clock time in the integration's timezone: a date "
            "(2024-01-01), or a date and a whole hour (2024-01-01 10:00) for hourly partitions."
        ),
    )

    @field_validator("start")
    @classmethod
    def _aligned(cls, start: datetime, info: ValidationInfo) -> datetime:
        granularity = info.data.get("granularity")
        if granularity is Granularity.DAILY and start.time() != time():
            _fail(
                f"{_format_start(start)} is not midnight; daily partitions start on a date "
                "like 2024-01-01"
            )
        on_the_hour = start.minute == start.second == start.microsecond == 0
        if granularity is Granularity.HOURLY and not on_the_hour:
            _fail(
                f"{_format_start(start)} is not on the hour; hourly partitions start at a whole "
                "hour like 2024-01-01 10:00"
            )
        return start


class FreshnessConfig(_Strict):
    """How old the latest successful sync may get before a warning, then a failure."""

    # json_schema_extra: the schema shows defaults as the file writes them, not as ISO 8601.
    warn_after: Duration = Field(
        default=timedelta(hours=2),
        description="Warn when the last sync is older (30m, 2h, 1d).",
        json_schema_extra={"default": "2h"},
    )
    fail_after: Duration = Field(
        default=timedelta(hours=6),
        description="Fail when the last sync is older (30m, 2h, 1d).",
        json_schema_extra={"default": "6h"},
    )

    @model_validator(mode="after")
    def _ordered(self) -> Self:
        if self.warn_after >= self.fail_after:
            warn, fail = (self._shown(name) for name in ("warn_after", "fail_after"))
            _fail(f"warn_after ({warn}) must be shorter than fail_after ({fail})")
        return self

    def _shown(self, name: str) -> str:
        text = _format_duration(getattr(self, name))
        return text if name in self.model_fields_set else f"{text}, the default"


class PartitionsKey(NamedTuple):
    """What makes two integrations' partitions identical, so they can share jobs."""

    granularity: Granularity
    start: datetime
    timezone: str


class Integration(_Strict):
    """One Hermes site feeding one icomm master database: an entry of ``integrations:``."""

    name: Name = Field(
        description=(
            "Unique identifier, [a-z][a-z0-9_]{0,62}; used in asset keys, job and schedule names."
        )
    )
    display_name: DisplayName = Field(
        default_factory=lambda data: data["name"],
        description='The "Mi integración" label shown to people; free text (default: name).',
    )
    site_url: SiteUrl = Field(
        description=(
            "The Hermes site's base URL; https (plain http only for localhost/127.0.0.1/[::1])."
        )
    )
    app_token_env: EnvName = Field(
        description=(
            "NAME of the environment variable that holds the site's App Token (never the token)."
        )
    )
    master_database: DatabaseName = Field(
        description='The icomm master database ("Base de Datos") the clients are loaded into.'
    )
    enabled: Flag = Field(default=True, description="The on/off switch of the integration.")
    timezone: TimeZoneName = Field(
        default="UTC",
        description="IANA time zone of the schedule and partitions (default: defaults, else UTC).",
    )
    schedule: CronExpression = Field(
        default="0 * * * *", description="Cron expression (5 fields), evaluated in `timezone`."
    )
    partitions: PartitionsConfig = Field(description="Time partitions of the integration's assets.")
    page_size: PageSize = Field(default=500, description="Clients per API page, 1..1000.")
    max_requests_per_second: Rate = Field(
        default=5.0, description="Client-side request rate limit towards this site, > 0."
    )
    default_country: CountryCode = Field(
        default="CL", description="ISO 3166-1 alpha-2 country for phones written without one."
    )
    max_reject_ratio: Ratio = Field(
        default=0.05,
        description="Largest share of rejected clients (0..1) before the blocking check fails.",
    )
    auto_pause_after_failures: AtLeastOne = Field(
        default=3,
        description="Consecutive credential failures (401/403) before the integration pauses.",
    )
    freshness: FreshnessConfig = Field(
        default_factory=FreshnessConfig, description="Age limits of the latest successful sync."
    )
    max_concurrent_runs: AtLeastOne = Field(
        default=1, description="How many runs of this integration may execute at once, >= 1."
    )

    @property
    def zone(self) -> ZoneInfo:
        """The integration's time zone."""
        return ZoneInfo(self.timezone)

    @property
    def api_url(self) -> str:
        """Base URL of the site's Hermes API."""
        return self.site_url + API_PATH

    @property
    def group_name(self) -> str:
        """The Dagster asset group of the integration."""
        return self.name

    @property
    def asset_prefix(self) -> list[str]:
        """The asset key prefix of the integration's assets."""
        return ["hermes", self.name]

    @property
    def partitions_key(self) -> PartitionsKey:
        """Identity of the partitions definition; equal keys can share one job."""
        return PartitionsKey(self.partitions.granularity, self.partitions.start, self.timezone)

    @property
    def partitions_start(self) -> datetime:
        """The first partition's start as an aware datetime in the integration's zone."""
        return self.partitions.start.replace(tzinfo=self.zone)


class _PartitionsDefaults(_Strict):
    granularity: GranularityName | None = None
    start: PartitionStart | None = None


class _FreshnessDefaults(_Strict):
    warn_after: Duration | None = None
    fail_after: Duration | None = None


class _Defaults(_Strict):
    """The ``defaults:`` block: any integration field but ``name``, each optional."""

    display_name: DisplayName | None = None
    site_url: SiteUrl | None = None
    app_token_env: EnvName | None = None
    master_database: DatabaseName | None = None
    enabled: Flag | None = None
    timezone: TimeZoneName | None = None
    schedule: CronExpression | None = None
    partitions: _PartitionsDefaults | None = None
    page_size: PageSize | None = None
    max_requests_per_second: Rate | None = None
    default_country: CountryCode | None = None
    max_reject_ratio: Ratio | None = None
    auto_pause_after_failures: AtLeastOne | None = None
    freshness: _FreshnessDefaults | None = None
    max_concurrent_runs: AtLeastOne | None = None


_NESTED_MODELS: dict[str, type[_Strict]] = {
    "partitions": PartitionsConfig,
    "freshness": FreshnessConfig,
}


class IntegrationsConfig(BaseModel):
    """Every integration declared in the file, in file order."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    integrations: tuple[Integration, ...] = ()
    path: str = Field(default=DEFAULT_FILE_NAME, description="The file, as shown in messages.")

    @property
    def names(self) -> tuple[str, ...]:
        """The integration names, in file order."""
        return tuple(integration.name for integration in self.integrations)

    @property
    def enabled(self) -> tuple[Integration, ...]:
        """The integrations switched on."""
        return tuple(integration for integration in self.integrations if integration.enabled)

    def get(self, name: str) -> Integration:
        """The integration called ``name``.

        Raises:
            KeyError: no integration has that name; the message lists the known ones.
        """
        for integration in self.integrations:
            if integration.name == name:
                return integration
        known = ", ".join(self.names) or "none"
        raise KeyError(f"no integration named {name!r} in {self.path} (known: {known})")

    def only(self, name: str) -> IntegrationsConfig:
        """The same file as if it declared integration ``name`` alone (KeyError if it does not).

        A process that works on one integration (``hermes-orchestration sync NAME``) builds the
        definitions of that one, not of every integration in the file.
        """
        return self.model_copy(update={"integrations": (self.get(name),)})

    def by_master_database(self) -> dict[str, tuple[Integration, ...]]:
        """The integrations grouped by the master database they feed, in file order."""
        groups: dict[str, list[Integration]] = {}
        for integration in self.integrations:
            groups.setdefault(integration.master_database, []).append(integration)
        return {database: tuple(members) for database, members in groups.items()}


# --- Problems ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ConfigProblem:
    """One thing wrong with the file.

    ``integration`` is the integration's name, or ``"#3"`` (1-based position) when the entry has
    no readable name; None for problems outside any integration.
    """

    file: str
    line: int | None
    integration: str | None
    message: str

    def __str__(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        if self.integration is None:
            return f"{where}: {self.message}"
        if self.integration.startswith("#"):
            return f"{where}: integration {self.integration}: {self.message}"
        return f"{where}: integration '{self.integration}': {self.message}"


class IntegrationsFileError(Exception):
    """The integrations file is unusable; ``problems`` lists everything wrong with it."""

    def __init__(self, problems: tuple[ConfigProblem, ...] | list[ConfigProblem]) -> None:
        self.problems = tuple(problems)
        super().__init__("\n".join(str(problem) for problem in self.problems))

    def __reduce__(self) -> tuple[type[IntegrationsFileError], tuple[tuple[ConfigProblem, ...]]]:
        # Keeps the exception picklable (it crosses process boundaries in Dagster).
        return (type(self), (self.problems,))


# --- Step 1: YAML text -> plain values with their lines ---------------------------------------


@dataclass
class _Where:
    """The line of a value in the file, and of the values inside it."""

    line: int
    children: dict[str | int, _Where] = field(default_factory=dict)

    def line_of(self, path: _KeyPath) -> int:
        """The line of ``path``, or of its deepest part present in the file."""
        where = self
        for part in path:
            child = where.children.get(part)
            if child is None:
                break
            where = child
        return where.line


@dataclass(frozen=True)
class _Issue:
    """A problem found while reading: ``path`` says where (and which integration) it belongs."""

    path: _KeyPath
    line: int | None
    body: str


class _Abort(Exception):
    def __init__(self, line: int | None, body: str) -> None:
        super().__init__(body)
        self.line = line
        self.body = body


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, used only to compose nodes and to build scalar values."""


# libyaml parses about ten times faster; its nodes are the same. Files it finds fault with are
# read again by the loader above, whose messages the error corpus pins down.
_FastLoader: type[yaml.SafeLoader] | None = getattr(yaml, "CSafeLoader", None)


_YAML_TAG = "tag:yaml.org,2002:"
_SCALAR_TAGS = frozenset(
    _YAML_TAG + t for t in ("null", "bool", "int", "float", "str", "timestamp")
)
_MERGE_TAG = _YAML_TAG + "merge"
_MAX_DEPTH = 40
_MAX_VALUES = 200_000  # aliases can make a tiny file expand exponentially


def _line(node: Node) -> int:
    return node.start_mark.line + 1


class _YamlReader:
    """Turns composed YAML nodes into plain values, recording lines and problems on the way."""

    def __init__(self, loader: _Loader) -> None:
        self._loader = loader
        self._open: set[int] = set()
        self._count = 0
        self.issues: list[_Issue] = []

    def read(self, node: Node, path: _KeyPath, depth: int = 0) -> tuple[Any, _Where]:
        self._count += 1
        if self._count > _MAX_VALUES:
            raise _Abort(_line(node), "the file expands to too many values (check its aliases)")
        if depth > _MAX_DEPTH:
            raise _Abort(_line(node), f"values are nested more than {_MAX_DEPTH} levels deep")
        if isinstance(node, ScalarNode):
            return self._scalar(node, path), _Where(_line(node))
        if id(node) in self._open:
            raise _Abort(_line(node), "a YAML alias refers to a value that contains it")
        self._open.add(id(node))
        try:
            if isinstance(node, SequenceNode):
                return self._sequence(node, path, depth)
            return self._mapping(node, path, depth)
        finally:
            self._open.discard(id(node))

    def _unsupported_tag(self, node: Node, path: _KeyPath) -> None:
        tag = node.tag.replace(_YAML_TAG, "!!")
        self.issues.append(_Issue(path, _line(node), f"unsupported YAML tag {_show(tag)}"))

    def _scalar(self, node: ScalarNode, path: _KeyPath) -> Any:
        if node.tag in _SCALAR_TAGS:
            try:
                return self._loader.construct_object(node, deep=True)
            except (yaml.YAMLError, ValueError, TypeError, AttributeError, OverflowError):
                # e.g. "2024-02-30" looks like a date but is none: validation reports the text.
                return node.value
        implicit = (node.style is None, node.style is not None)
        if self._loader.resolve(ScalarNode, node.value, implicit) != node.tag:
            self._unsupported_tag(node, path)
        return node.value  # plain "=" or "<<" in a value position: just text

    def _sequence(self, node: SequenceNode, path: _KeyPath, depth: int) -> tuple[list[Any], _Where]:
        if node.tag != _YAML_TAG + "seq":
            self._unsupported_tag(node, path)
        values: list[Any] = []
        where = _Where(_line(node))
        for index, item in enumerate(node.value):
            value, item_where = self.read(item, (*path, index), depth + 1)
            values.append(value)
            where.children[index] = item_where
        return values, where

    def _mapping(
        self, node: MappingNode, path: _KeyPath, depth: int
    ) -> tuple[dict[str, Any], _Where]:
        if node.tag != _YAML_TAG + "map":
            self._unsupported_tag(node, path)
        values: dict[str, Any] = {}
        where = _Where(_line(node))
        # YAML merge keys ("<<: *anchor") first: keys written in the mapping itself win.
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE_TAG:
                self._merge(value_node, path, depth, values, where)
        explicit: dict[str, Any] = {}
        first_line: dict[str, int] = {}
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE_TAG:
                continue
            if not isinstance(key_node, ScalarNode):
                self.issues.append(
                    _Issue(path, _line(key_node), "a key must be plain text, not a list or mapping")
                )
                continue
            key = key_node.value
            if key in first_line:
                self.issues.append(
                    _Issue(
                        path,
                        _line(key_node),
                        f"duplicate key {_show(key)} (first at line {first_line[key]}); "
                        "YAML would silently keep only the last one",
                    )
                )
            else:
                first_line[key] = _line(key_node)
            value, value_where = self.read(value_node, (*path, key), depth + 1)
            explicit[key] = value
            value_where.line = _line(key_node)  # point at "key: value", not at the value alone
            where.children[key] = value_where
        values.update(explicit)
        return values, where

    def _merge(
        self,
        node: Node,
        path: _KeyPath,
        depth: int,
        values: dict[str, Any],
        where: _Where,
    ) -> None:
        sources = node.value if isinstance(node, SequenceNode) else [node]
        for source in sources:  # earlier sources win, as the YAML merge key specifies
            if not isinstance(source, MappingNode):
                self.issues.append(
                    _Issue(
                        path,
                        _line(source),
                        "'<<' merges a mapping or a list of mappings (e.g. <<: *common)",
                    )
                )
                continue
            merged, merged_where = self.read(source, path, depth + 1)
            for key, value in merged.items():
                if key not in values:
                    values[key] = value
                    where.children[key] = merged_where.children[key]


def _syntax_issue(error: yaml.YAMLError, text: str) -> _Issue:
    if isinstance(error, ReaderError):
        line = text[: error.position].count("\n") + 1
        code = f"#x{error.character:04x}" if isinstance(error.character, int) else "a character"
        return _Issue((), line, f"YAML syntax error: {code} is not allowed in YAML; remove it")
    problem_mark = getattr(error, "problem_mark", None)
    context_mark = getattr(error, "context_mark", None)
    mark = problem_mark or context_mark
    problem = getattr(error, "problem", None) or ""
    context = getattr(error, "context", None) or ""
    if context == "expected a single document in the stream":
        detail = "the file holds more than one YAML document; keep a single one (remove '---')"
    else:
        detail = problem or context or str(error).splitlines()[0]
        if problem and context:
            elsewhere = context_mark and problem_mark and context_mark.line != problem_mark.line
            started = f" started at line {context_mark.line + 1}" if elsewhere else ""
            detail += f" ({context}{started})"
        if "'\\t'" in problem:
            detail += "; indent with spaces, not tabs"
    column = f" at column {mark.column + 1}" if mark else ""
    return _Issue((), mark.line + 1 if mark else None, f"YAML syntax error{column}: {detail}")


def _read_yaml(text: str) -> tuple[Any, _Where, list[_Issue]]:
    """The document's plain value (None when there is none), its lines, and reading problems."""
    if _FastLoader is not None and not yaml.reader.Reader.NON_PRINTABLE.search(text):
        read = _read_yaml_with(_FastLoader(text), text)
        if not read[2]:
            return read
    try:
        loader = _Loader(text)  # checks for characters YAML forbids
    except yaml.YAMLError as error:
        return None, _Where(1), [_syntax_issue(error, text)]
    return _read_yaml_with(loader, text)


def _read_yaml_with(loader: Any, text: str) -> tuple[Any, _Where, list[_Issue]]:
    try:
        root = loader.get_single_node()
        if root is None:
            return None, _Where(1), []
        reader = _YamlReader(loader)
        value, where = reader.read(root, ())
        return value, where, reader.issues
    except yaml.YAMLError as error:
        return None, _Where(1), [_syntax_issue(error, text)]
    except RecursionError:
        too_deep = _Issue((), None, "YAML syntax error: values are nested too deeply")
        return None, _Where(1), [too_deep]
    except _Abort as abort:
        return None, _Where(1), [_Issue((), abort.line, abort.body)]
    finally:
        loader.dispose()


# --- Step 2: plain values -> validated models -------------------------------------------------

_SECRET_WORDS = ("token", "secret", "password", "passwd", "api_key", "apikey")


def _unknown_key(key: str, value: object, known: list[str]) -> str:
    lowered = key.lower()
    names_a_variable = isinstance(value, str) and re.fullmatch(ENV_NAME_PATTERN, value)
    if any(word in lowered for word in _SECRET_WORDS) and not names_a_variable:
        shown = "a key that looks like a secret" if _looks_secret(key) else key
        if "token" in lowered:
            return (
                f"{shown}: the App Token never goes in integrations.yaml; set it in an "
                "environment variable and name that variable in app_token_env"
            )
        return f"{shown}: secrets never go in integrations.yaml; keep them in environment variables"
    close = difflib.get_close_matches(key, known, n=1) or [
        name for name in known if len(key) >= 3 and name.startswith(key)
    ]
    hint = f"did you mean {close[0]!r}?" if close else "known keys: " + ", ".join(known)
    return f"unknown key {_show(key)} ({hint})"


@dataclass(frozen=True)
class _FieldError:
    """A validation error: ``loc`` is the value it concerns, ``prefix`` the path its message
    names (the parent mapping, for a missing or unknown key)."""

    loc: _KeyPath
    prefix: _KeyPath
    body: str


def _field_error(error: ErrorDetails, model: type[_Strict]) -> _FieldError:
    loc = tuple(error["loc"])
    kind = error["type"]
    if kind == "missing":
        body = f"missing required field '{loc[-1]}'{_MISSING_HINTS.get(loc, '')}"
        return _FieldError(loc, loc[:-1], body)
    if kind == "extra_forbidden":
        parent = loc[:-1]
        fields = _NESTED_MODELS[str(parent[0])] if parent else model
        body = _unknown_key(str(loc[-1]), error["input"], list(fields.model_fields))
        return _FieldError(loc, parent, body)
    if kind == _ERROR_TYPE:
        return _FieldError(loc, loc, str(error.get("ctx", {}).get("message", error["msg"])))
    if kind in ("model_type", "dict_type", "model_attributes_type"):
        example = _MAPPING_EXAMPLES.get(str(loc[-1]) if loc else "", "")
        like = f" like {example}" if example else ""
        return _FieldError(loc, loc, f"expected a mapping{like}, got {_show(error['input'])}")
    return _FieldError(loc, loc, error["msg"])  # pydantic's wording never includes the input


def _validate(model: type[_Strict], data: dict[str, Any]) -> tuple[Any, list[_FieldError]]:
    try:
        return model.model_validate(data), []
    except ValidationError as err:
        errors = [
            _field_error(error, model)
            for error in err.errors(include_url=False)
            # A default computed from another field is skipped when that field is invalid.
            if error["type"] != "default_factory_not_called"
        ]
        return None, errors


def _label(index: int, item: object) -> str:
    name = item.get("name") if isinstance(item, dict) else None
    if (
        isinstance(name, str)
        and 0 < len(name) <= 80
        and name.isprintable()
        and not name.startswith("#")
        and not _looks_secret(name)
    ):
        return name
    return f"#{index + 1}"


@dataclass
class _Merged:
    """An integration entry with the defaults applied, and where each value came from."""

    data: dict[str, Any]
    where: _Where
    inherited: set[tuple[str, ...]]

    def from_defaults(self, path: _KeyPath) -> bool:
        return any(path[:size] in self.inherited for size in (1, 2))


def _apply_defaults(
    defaults: dict[str, Any], defaults_where: _Where, item: dict[str, Any], item_where: _Where
) -> _Merged:
    # Mappings (partitions, freshness) merge one level deep, so that `defaults` can set
    # partitions.granularity while each integration sets its own partitions.start.
    merged = _Merged(dict(defaults), _Where(item_where.line), set())
    for key in defaults:
        merged.where.children[key] = defaults_where.children[key]
        merged.inherited.add((key,))
    for key, value in item.items():
        base = merged.data.get(key) if (key,) in merged.inherited else None
        merged.inherited.discard((key,))
        if isinstance(base, dict) and isinstance(value, dict):
            merged.data[key] = {**base, **value}
            children = {
                **defaults_where.children[key].children,
                **item_where.children[key].children,
            }
            merged.where.children[key] = _Where(item_where.children[key].line, children)
            merged.inherited.update((key, sub) for sub in base if sub not in value)
        else:
            merged.data[key] = value
            merged.where.children[key] = item_where.children[key]
    return merged


class _Parser:
    """Collects every problem of one file while validating it."""

    def __init__(self, filename: str) -> None:
        self.filename = filename
        self.issues: list[_Issue] = []
        self.labels: dict[int, str] = {}

    def add(self, path: _KeyPath, line: int | None, body: str) -> None:
        self.issues.append(_Issue(path, line, body))

    def problems(self) -> tuple[ConfigProblem, ...]:
        problems: dict[str, ConfigProblem] = {}
        for issue in self.issues:
            problem = self._problem(issue)
            problems.setdefault(str(problem), problem)
        return tuple(sorted(problems.values(), key=lambda p: p.line or 0))

    def _problem(self, issue: _Issue) -> ConfigProblem:
        path, integration = issue.path, None
        if len(path) >= 2 and path[0] == "integrations" and isinstance(path[1], int):
            integration = self.labels.get(path[1], f"#{path[1] + 1}")
            path = path[2:]
        prefix = ".".join(str(part) for part in path)
        message = f"{prefix}: {issue.body}" if prefix else issue.body
        return ConfigProblem(self.filename, issue.line, integration, message)

    def parse(self, text: str) -> tuple[Integration, ...]:
        root, where, issues = _read_yaml(text)
        self.issues.extend(issues)
        if issues and root is None:
            return ()
        if root is None:
            self.add((), None, "the file is empty; it needs an 'integrations:' list")
            return ()
        if not isinstance(root, dict):
            self.add(
                (),
                where.line,
                f"the top level must be a mapping with an 'integrations' list, got {_show(root)}",
            )
            return ()
        for key, value in root.items():
            if key not in ("defaults", "integrations"):
                body = _unknown_key(key, value, ["defaults", "integrations"])
                self.add((), where.line_of((key,)), body)
        defaults, failed = self._defaults(root.get("defaults"), where.children.get("defaults"))
        if "integrations" not in root:
            self.add(
                (),
                None,
                "missing required key 'integrations' (a list with one entry per Hermes site; "
                "it may be empty: integrations: [])",
            )
            return ()
        items = root["integrations"]
        items_where = where.children["integrations"]
        if items is None:
            return ()  # "integrations:" with every entry removed or commented out
        if not isinstance(items, list):
            self.add(
                ("integrations",),
                items_where.line,
                f"expected a list of integrations (each item starting with '- name:'), "
                f"got {_show(items)}",
            )
            return ()
        self.labels = {index: _label(index, item) for index, item in enumerate(items)}
        defaults_where = where.children.get("defaults", _Where(1))
        valid = [
            self._integration(index, item, items_where, (defaults, defaults_where, failed))
            for index, item in enumerate(items)
        ]
        self._check_unique_names(items, items_where)
        return tuple(integration for integration in valid if integration is not None)

    def _defaults(self, raw: object, where: _Where | None) -> tuple[dict[str, Any], set[_KeyPath]]:
        """The usable defaults, and the paths whose default value is invalid (reported here)."""
        if raw is None or where is None:
            return {}, set()
        if not isinstance(raw, dict):
            self.add(
                ("defaults",),
                where.line,
                f"expected a mapping of fields shared by every integration, got {_show(raw)}",
            )
            return {}, set()
        if "name" in raw:
            self.add(
                ("defaults",),
                where.line_of(("name",)),
                "'name' cannot have a default; every integration sets its own",
            )
        candidate = {key: value for key, value in raw.items() if key != "name"}
        _, errors = _validate(_Defaults, candidate)
        failed: set[_KeyPath] = set()
        for error in errors:
            self.add(("defaults", *error.prefix), where.line_of(error.loc), error.body)
            failed.add(error.loc)
        usable = {key: value for key, value in candidate.items() if key in Integration.model_fields}
        return usable, failed

    def _integration(
        self,
        index: int,
        item: object,
        items_where: _Where,
        defaults: tuple[dict[str, Any], _Where, set[_KeyPath]],
    ) -> Integration | None:
        scope: _KeyPath = ("integrations", index)
        item_where = items_where.children[index]
        defaults_values, defaults_where, failed_defaults = defaults
        if not isinstance(item, dict):
            self.add(
                scope,
                item_where.line,
                "expected a mapping of fields (name, site_url, app_token_env, master_database, "
                f"partitions, ...), got {_show(item)}",
            )
            return None
        merged = _apply_defaults(defaults_values, defaults_where, item, item_where)
        integration, errors = _validate(Integration, merged.data)
        for error in errors:
            body = error.body
            if merged.from_defaults(error.loc):
                if error.loc in failed_defaults:
                    continue  # already reported once, under `defaults`
                body += " (value from defaults)"
            self.add((*scope, *error.prefix), merged.where.line_of(error.loc), body)
        return integration

    def _check_unique_names(self, items: list[Any], items_where: _Where) -> None:
        first: dict[str, int] = {}
        for index, item in enumerate(items):
            name = item.get("name") if isinstance(item, dict) else None
            if not isinstance(name, str):
                continue
            line = items_where.children[index].line_of(("name",))
            if name in first:
                self.add(
                    ("integrations", index),
                    line,
                    f"duplicate integration name {_show(name)} "
                    f"(first declared at line {first[name]})",
                )
            else:
                first[name] = line


# --- Public entry points -----------------------------------------------------------------------


def parse_integrations(text: str, filename: str = DEFAULT_FILE_NAME) -> IntegrationsConfig:
    """Validate the text of an integrations file.

    Args:
        text: the YAML text.
        filename: how the file is named in messages.

    Raises:
        IntegrationsFileError: listing every problem in the file at once.
    """
    parser = _Parser(filename)
    with collection_paused():
        integrations = parser.parse(text)
    if parser.issues:
        raise IntegrationsFileError(parser.problems())
    return IntegrationsConfig(integrations=integrations, path=filename)


def integrations_file_path() -> Path:
    """Where the integrations file is: ``$HERMES_INTEGRATIONS_FILE``, else the project's own."""
    override = os.environ.get(INTEGRATIONS_FILE_ENV, "").strip()
    if override:
        return Path(override).expanduser()
    project_file = Path(__file__).resolve().parent.parent / DEFAULT_FILE_NAME
    if project_file.is_file():
        return project_file
    # Installed as a package (not a checkout): the file sits where the code location runs.
    return Path.cwd() / DEFAULT_FILE_NAME


def _shown(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def load_integrations(path: str | os.PathLike[str] | None = None) -> IntegrationsConfig:
    """Read and validate the integrations file (by default, :func:`integrations_file_path`).

    Raises:
        IntegrationsFileError: the file is missing, unreadable or invalid; every problem listed.
    """
    if path is None:
        file = integrations_file_path()
        shown = os.environ.get(INTEGRATIONS_FILE_ENV, "").strip() or _shown(file)
    else:
        file, shown = Path(path), os.fspath(path)

    def fail(message: str, line: int | None = None) -> IntegrationsFileError:
        return IntegrationsFileError([ConfigProblem(shown, line, None, message)])

    try:
        raw = file.read_bytes()
    except FileNotFoundError:
        raise fail(
            f"file not found; create it (the repository ships an example) or set "
            f"{INTEGRATIONS_FILE_ENV} to its path"
        ) from None
    except IsADirectoryError:
        raise fail("is a directory, not a file") from None
    except OSError as err:
        raise fail(f"cannot be read: {err.strerror or err}") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise fail("is not UTF-8 text; save it as UTF-8", line) from None
    config = parse_integrations(text, shown)
    logger.debug("Loaded %d integrations from %s", len(config.integrations), shown)
    return config


def _inline_refs(schema: Any, definitions: dict[str, Any]) -> Any:
    """``schema`` with every local ``$ref`` replaced by its definition (one self-contained tree)."""
    if isinstance(schema, dict):
        ref = schema.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/$defs/"):
            rest = {key: value for key, value in schema.items() if key != "$ref"}
            return {**_inline_refs(definitions[ref.removeprefix("#/$defs/")], definitions), **rest}
        return {key: _inline_refs(value, definitions) for key, value in schema.items()}
    if isinstance(schema, list):
        return [_inline_refs(item, definitions) for item in schema]
    return schema


def _walk_schema(schema: Any) -> Iterator[dict[str, Any]]:
    if isinstance(schema, dict):
        yield schema
        for value in schema.values():
            yield from _walk_schema(value)
    elif isinstance(schema, list):
        for item in schema:
            yield from _walk_schema(item)


def json_schema() -> dict[str, Any]:
    """The JSON Schema of the whole file, for editor completion (yaml-language-server)."""
    generated = Integration.model_json_schema()
    definitions = generated.pop("$defs", {})
    integration = _inline_refs(generated, definitions)
    for node in _walk_schema(integration):
        node.pop("title", None)  # pydantic's titles repeat the key names
    integration["description"] = (
        "One Hermes site feeding one icomm master database. Required, here or in `defaults`: "
        "site_url, app_token_env, master_database and partitions.start."
    )
    # An entry may take any field but its name from `defaults`, so the schema can only insist on
    # the name; the loader checks the rest once the defaults are applied.
    integration["required"] = ["name"]
    integration["properties"]["partitions"].pop("required", None)
    defaults_properties = {
        key: value for key, value in integration["properties"].items() if key != "name"
    }
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "Hermes integrations",
        "description": "The integrations file: one entry per Hermes site feeding icomm.",
        "type": "object",
        "additionalProperties": False,
        "required": ["integrations"],
        "properties": {
            "defaults": {
                "description": "Values every integration gets unless it sets its own; any "
                "integration field except name.",
                "type": ["object", "null"],
                "additionalProperties": False,
                "properties": defaults_properties,
            },
            "integrations": {
                "description": "One entry per Hermes site; may be empty.",
                "type": ["array", "null"],
                "items": integration,
            },
        },
    }

"""The reason codes that validation gives for rejecting a client row or clearing one of its fields.

The codes are stable: they are stored with rejected rows and in ``quality_notes``, counted in run
metadata and shown in the README, so a code is never renamed or reused for another meaning.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

Kind = Literal["rejected", "cleared"]

# Rejected: the row is not loaded; it goes to the rejected table with all its codes.
NOT_AN_OBJECT = "not_an_object"
MISSING_ID = "missing_id"
INVALID_UPDATED_AT = "invalid_updated_at"
INVALID_DELETED_AT = "invalid_deleted_at"
MISSING_EMAIL = "missing_email"
INVALID_EMAIL = "invalid_email"
INVALID_RUT = "invalid_rut"

# Cleared: the row is loaded with the field set to null and a note in ``quality_notes``.
INVALID_PHONE = "invalid_phone"
INVALID_BIRTH_DATE = "invalid_birth_date"
BIRTH_DATE_IN_FUTURE = "birth_date_in_future"
BIRTH_DATE_TOO_OLD = "birth_date_too_old"
INVALID_COUNTRY = "invalid_country"
INVALID_CREATED_AT = "invalid_created_at"
INVALID_ACCEPTS_MARKETING = "invalid_accepts_marketing"
INVALID_CUSTOM_FIELDS = "invalid_custom_fields"

# The oldest birth date accepted, in years before the day of validation.
MAX_AGE_YEARS = 120


class Reason(NamedTuple):
    """What a reason code means and what validation does about it."""

    kind: Kind
    meaning: str
    outcome: str


_REJECTED = "Row rejected; it is kept with its raw record in the rejected rows."

REASONS: dict[str, Reason] = {
    NOT_AN_OBJECT: Reason(
        "rejected",
        "The item in the page's `data` is not a JSON object.",
        _REJECTED,
    ),
    MISSING_ID: Reason(
        "rejected",
        "`id` is missing, null or blank.",
        _REJECTED,
    ),
    INVALID_UPDATED_AT: Reason(
        "rejected",
        "`updated_at` is missing or not an RFC 3339 date-time with an offset.",
        _REJECTED,
    ),
    INVALID_DELETED_AT: Reason(
        "rejected",
        "`deleted_at` is set but not an RFC 3339 date-time with an offset.",
        "Row rejected rather than loaded as not deleted, so a deletion is never lost.",
    ),
    MISSING_EMAIL: Reason(
        "rejected",
        "`email` is missing, null or blank on a client that is not deleted.",
        _REJECTED,
    ),
    INVALID_EMAIL: Reason(
        "rejected",
        "`email` is not a valid address (syntax only, no DNS lookup).",
        _REJECTED + " On a deleted client the email is cleared instead.",
    ),
    INVALID_RUT: Reason(
        "rejected",
        "`document_type` is RUT and `document_number` is not a valid RUT (format, length or "
        "check digit).",
        _REJECTED + " On a deleted client the document number is cleared instead.",
    ),
    INVALID_PHONE: Reason(
        "cleared",
        "`phone` is not a valid number, read with the client's country (or the site's "
        "default country) for numbers without a `+` prefix.",
        "`phone` set to null.",
    ),
    INVALID_BIRTH_DATE: Reason(
        "cleared",
        "`birth_date` is not a calendar date written as YYYY-MM-DD.",
        "`birth_date` set to null.",
    ),
    BIRTH_DATE_IN_FUTURE: Reason(
        "cleared",
        "`birth_date` is after the day of validation.",
        "`birth_date` set to null.",
    ),
    BIRTH_DATE_TOO_OLD: Reason(
        "cleared",
        f"`birth_date` is more than {MAX_AGE_YEARS} years before the day of validation.",
        "`birth_date` set to null.",
    ),
    INVALID_COUNTRY: Reason(
        "cleared",
        "`country` is not an ISO 3166-1 alpha-2 code.",
        "`country` set to null.",
    ),
    INVALID_CREATED_AT: Reason(
        "cleared",
        "`created_at` is not an RFC 3339 date-time with an offset.",
        "`created_at` set to null.",
    ),
    INVALID_ACCEPTS_MARKETING: Reason(
        "cleared",
        "`accepts_marketing` is neither `true` nor `false`.",
        "`accepts_marketing` set to null.",
    ),
    INVALID_CUSTOM_FIELDS: Reason(
        "cleared",
        "`custom_fields` is not a JSON object.",
        "`custom_fields` set to null.",
    ),
}


def codes(kind: Kind) -> tuple[str, ...]:
    """The reason codes of one kind, in catalogue order."""
    return tuple(code for code, reason in REASONS.items() if reason.kind == kind)


def markdown_table() -> str:
    """The catalogue as a Markdown table, for the README."""
    lines = ["| Code | Kind | Meaning | What happens |", "| --- | --- | --- | --- |"]
    lines += [
        f"| `{code}` | {reason.kind} | {reason.meaning} | {reason.outcome} |"
        for code, reason in REASONS.items()
    ]
    return "\n".join(lines) + "\n"

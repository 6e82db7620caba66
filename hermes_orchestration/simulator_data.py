"""The client dataset that the bundled Hermes simulator serves.

A site's clients are generated once, deterministically from (seed, clients, start, end,
dirty_share): realistic Chilean customers (a few from Argentina and Peru), with about
``dirty_share`` of them carrying the kinds of dirt a real site sends (see ``DIRTY_KINDS``).

Every version of every client is serialized once, to JSON bytes, and kept in listing order
(``updated_at`` instant, then ``id``) next to an array of instants in epoch microseconds, so that a
page is a bisect plus a slice. Nothing here holds a decoded dict per client: a million clients
fit in about half a gigabyte.
"""

from __future__ import annotations

import random
import re
import threading
from array import array
from bisect import bisect_left, bisect_right
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, date, datetime, timedelta
from itertools import accumulate
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import orjson

if TYPE_CHECKING:
    from hermes_orchestration.simulator import SimulatorConfig

T = TypeVar("T")

# The kinds of dirt a dirty client may carry; one client may combine a few of them.
INVALID_EMAIL = "invalid_email"  # no @, spaces, double dots, no top-level domain
MISSING_EMAIL = "missing_email"  # null or ""
UNNORMALIZED_EMAIL = "unnormalized_email"  # upper case or space padded; valid once normalized
BAD_RUT_CHECK_DIGIT = "bad_rut_check_digit"
DUPLICATE = "duplicate"  # listed twice in the window: an older and a newer version
CHANGED_EMAIL = "changed_email"  # a duplicate whose newer version has another email
TOMBSTONE = "tombstone"  # deleted_at set
TOMBSTONE_WITHOUT_EMAIL = "tombstone_without_email"  # a tombstone with its personal data wiped
UNKNOWN_PROPERTY = "unknown_property"  # properties the contract does not name
GARBAGE_PHONE = "garbage_phone"
FUTURE_BIRTH_DATE = "future_birth_date"
UNPARSEABLE_BIRTH_DATE = "unparseable_birth_date"
COUNTRY_NAME = "country_name"  # "Chile" instead of "CL"
EMPTY_STRINGS = "empty_strings"  # "" in some string properties

# Kinds of dirt that live in the fields a deletion may wipe.
_WIPED_KINDS = frozenset(
    {
        INVALID_EMAIL,
        MISSING_EMAIL,
        UNNORMALIZED_EMAIL,
        BAD_RUT_CHECK_DIGIT,
        GARBAGE_PHONE,
        FUTURE_BIRTH_DATE,
        UNPARSEABLE_BIRTH_DATE,
    }
)

DIRTY_KINDS: tuple[str, ...] = (
    INVALID_EMAIL,
    MISSING_EMAIL,
    UNNORMALIZED_EMAIL,
    BAD_RUT_CHECK_DIGIT,
    DUPLICATE,
    CHANGED_EMAIL,
    TOMBSTONE,
    TOMBSTONE_WITHOUT_EMAIL,
    UNKNOWN_PROPERTY,
    GARBAGE_PHONE,
    FUTURE_BIRTH_DATE,
    UNPARSEABLE_BIRTH_DATE,
    COUNTRY_NAME,
    EMPTY_STRINGS,
)

# ---------------------------------------------------------------------------------------------
# Timestamps

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)
_EPOCH_ORDINAL = _EPOCH.toordinal()
_US_PER_SECOND = 1_000_000
_RFC3339 = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})[Tt](\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?"
    r"(?:([Zz])|([+-])(\d{2}):(\d{2}))?"
)


def parse_rfc3339_us(text: str) -> int:
    """Parse an RFC 3339 timestamp with an explicit offset into epoch microseconds.

    Digits past the sixth fractional one round up, so that ``t >= bound`` and ``t < bound`` give
    the same answer for every microsecond ``t`` as they would with the exact bound.

    Raises:
        ValueError: the text is not RFC 3339, names an impossible date, or has no offset.
    """
    match = _RFC3339.fullmatch(text)
    if match is None:
        raise ValueError(f"{text!r} is not an RFC 3339 timestamp (e.g. 2024-05-01T00:00:00-04:00)")
    year, month, day, hour, minute, second, fraction, zulu, sign, off_h, off_m = match.groups()
    if zulu is None and sign is None:
        raise ValueError(f"{text!r} has no UTC offset; add Z or ±hh:mm (RFC 3339)")
    try:
        moment = datetime(int(year), int(month), int(day), int(hour), int(minute), int(second))
    except ValueError as err:
        raise ValueError(f"{text!r} is not a valid date and time: {err}") from None
    micros = 0
    if fraction:
        digits = fraction.ljust(9, "0")
        micros = int(digits[:6]) + (1 if int(digits[6:]) else 0)
    offset_us = 0
    if sign is not None:
        if int(off_h) > 23 or int(off_m) > 59:
            raise ValueError(f"{text!r} has an impossible UTC offset")
        offset_us = (int(off_h) * 3600 + int(off_m) * 60) * _US_PER_SECOND
        if sign == "-":
            offset_us = -offset_us
    local_us = (moment.replace(tzinfo=UTC) - _EPOCH) // _MICROSECOND
    return local_us + micros - offset_us


def datetime_to_us(moment: datetime) -> int:
    """Epoch microseconds of a timezone-aware datetime."""
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError(f"{moment.isoformat()} is a naive datetime; give it a timezone")
    return (moment - _EPOCH) // _MICROSECOND


def us_to_datetime(micros: int) -> datetime:
    """The UTC datetime of epoch microseconds."""
    return _EPOCH + timedelta(microseconds=micros)


# Offsets a site in America/Santiago may use, next to UTC; weights favour UTC.
_OFFSETS: tuple[tuple[str, int], ...] = (
    ("Z", 0),
    ("-03:00", -3 * 3600 * _US_PER_SECOND),
    ("-04:00", -4 * 3600 * _US_PER_SECOND),
)


def format_rfc3339(micros: int, suffix: str, offset_us: int, digits: int) -> str:
    """Format epoch microseconds at an offset with 0, 3 or 6 fractional digits (truncating)."""
    seconds, fraction = divmod(micros + offset_us, _US_PER_SECOND)
    days, second_of_day = divmod(seconds, 86_400)
    day = date.fromordinal(_EPOCH_ORDINAL + days)
    hour, rest = divmod(second_of_day, 3600)
    minute, second = divmod(rest, 60)
    text = f"{day.year:04d}-{day.month:02d}-{day.day:02d}T{hour:02d}:{minute:02d}:{second:02d}"
    if digits == 3:
        text += f".{fraction // 1000:03d}"
    elif digits == 6:
        text += f".{fraction:06d}"
    return text + suffix


# ---------------------------------------------------------------------------------------------
# Names and places


def _words(text: str) -> tuple[str, ...]:
    return tuple(text.split())


_FEMALE_NAMES = _words(
    """
    María Sofía Isidora Florencia Catalina Valentina Javiera Constanza Camila Fernanda Francisca
    Antonia Josefa Martina Agustina Emilia Trinidad Daniela Carolina Paula Macarena Claudia
    Patricia Andrea Verónica Alejandra Gabriela Natalia Paulina Bárbara Ximena Lorena Marcela
    Carmen Rosa Ana Isabel Pía Ignacia Amanda Belén Romina
    """
)
_MALE_NAMES = _words(
    """
    José Juan Luis Carlos Jorge Manuel Francisco Pedro Diego Sebastián Matías Nicolás Benjamín
    Vicente Agustín Tomás Joaquín Cristóbal Felipe Ignacio Gonzalo Rodrigo Andrés Pablo Alejandro
    Fernando Ricardo Claudio Patricio Mauricio Héctor Sergio Raúl Álvaro Maximiliano Gaspar
    Martín Lucas Bastián Eduardo Hernán
    """
)
_SURNAMES = _words(
    """
    González Muñoz Rojas Díaz Pérez Soto Contreras Silva Martínez Sepúlveda Morales Rodríguez
    López Fuentes Hernández Torres Araya Flores Espinoza Valenzuela Castillo Tapia Reyes Gutiérrez
    Castro Pizarro Álvarez Vásquez Sánchez Fernández Ramírez Carrasco Gómez Cortés Herrera Núñez
    Jara Vergara Rivera Figueroa Riquelme García Miranda Bravo Vera Molina Vega Campos Sandoval
    Orellana Zúñiga Olivares Alarcón Gallardo Ortiz Garrido Salazar Guzmán Henríquez Saavedra
    Navarro Aguilera Parra Romero Aravena Vargas Vidal Cáceres Yáñez Leiva Poblete Escobar
    Cárdenas Ulloa Pino
    """
)
# Region, weight (roughly its share of the population) and cities.
_CL_PLACES: tuple[tuple[str, int, str], ...] = (
    (
        "Región Metropolitana",
        40,
        "Santiago, Puente Alto, Maipú, La Florida, Las Condes, Providencia, Ñuñoa, San Bernardo, "
        "Peñalolén, Pudahuel, Vitacura, Quilicura",
    ),
    ("Valparaíso", 10, "Valparaíso, Viña del Mar, Quilpué, Villa Alemana, San Antonio"),
    ("Biobío", 9, "Concepción, Talcahuano, Los Ángeles, Coronel, San Pedro de la Paz"),
    ("Maule", 6, "Talca, Curicó, Linares"),
    ("Araucanía", 5, "Temuco, Padre Las Casas, Angol, Villarrica"),
    ("O'Higgins", 5, "Rancagua, San Fernando, Rengo"),
    ("Los Lagos", 5, "Puerto Montt, Osorno, Castro, Puerto Varas"),
    ("Coquimbo", 4, "La Serena, Coquimbo, Ovalle"),
    ("Antofagasta", 4, "Antofagasta, Calama"),
    ("Ñuble", 3, "Chillán, San Carlos"),
    ("Los Ríos", 2, "Valdivia, La Unión"),
    ("Tarapacá", 2, "Iquique, Alto Hospicio"),
    ("Atacama", 2, "Copiapó, Vallenar"),
    ("Arica y Parinacota", 1, "Arica"),
    ("Magallanes", 1, "Punta Arenas, Puerto Natales"),
    ("Aysén", 1, "Coyhaique"),
)
_AR_PLACES: tuple[tuple[str, int, str], ...] = (
    ("Buenos Aires", 6, "Buenos Aires, La Plata, Mar del Plata"),
    ("Mendoza", 2, "Mendoza"),
    ("Córdoba", 2, "Córdoba"),
    ("Neuquén", 1, "Neuquén"),
)
_AR_AREA_CODES = {
    "Buenos Aires": "11",
    "La Plata": "221",
    "Mar del Plata": "223",
    "Mendoza": "261",
    "Córdoba": "351",
    "Neuquén": "299",
}
_PE_PLACES: tuple[tuple[str, int, str], ...] = (
    ("Lima", 6, "Lima, Miraflores, San Isidro"),
    ("Arequipa", 2, "Arequipa"),
    ("Tacna", 1, "Tacna"),
)
_COUNTRY_NAMES = {"CL": "Chile", "AR": "Argentina", "PE": "Perú"}

# (domain, weight)
_EMAIL_DOMAINS: tuple[tuple[str, int], ...] = (
    ("gmail.com", 48),
    ("hotmail.com", 16),
    ("yahoo.es", 5),
    ("outlook.cl", 4),
    ("outlook.com", 7),
    ("live.cl", 4),
    ("icloud.com", 5),
    ("yahoo.com", 4),
    ("hotmail.cl", 3),
    ("uc.cl", 1),
    ("vtr.net", 1),
    ("entel.cl", 1),
    ("mail.udp.cl", 1),
)
_GARBAGE_PHONES = (
    "sin teléfono",
    "n/a",
    "12345",
    "0",
    "+56 9 8765",
    "9-8765-4321 / 2 2345 6789",
    "fono casa",
    "569",
    "+56 (9) 1234-567",
    "99999999999999",
    "-",
)
_UNPARSEABLE_BIRTH_DATES = (
    "31/12/1985",
    "1985-02-30",
    "15-03-1990",
    "no informa",
    "1990-13-45",
    "19/7/88",
    "0000-00-00",
)
_SEGMENTS = ("bronce", "plata", "oro", "platino")
_STORES = ("Mall Plaza Vespucio", "Costanera Center", "Mall Marina", "Online", "Parque Arauco")
_LOYALTY_TIERS = ("bronce", "plata", "oro", "diamante")


def _fold(text: str) -> str:
    """Lower-case ASCII for an email local part: accents and ñ dropped, spaces removed."""
    table = str.maketrans("áéíóúüñÁÉÍÓÚÜÑ'", "aeiouunAEIOUUN ")
    return text.translate(table).lower().replace(" ", "")


_FOLDED = {name: _fold(name) for name in (*_FEMALE_NAMES, *_MALE_NAMES, *_SURNAMES)}


def rut_check_digit(body: int) -> str:
    """The check digit of a RUT body (modulo 11: 0-9 or K)."""
    total, factor = 0, 2
    while body:
        total += (body % 10) * factor
        body //= 10
        factor = 2 if factor == 7 else factor + 1
    remainder = 11 - total % 11
    return "0" if remainder == 11 else "K" if remainder == 10 else str(remainder)


def _format_rut(body: int, check: str, style: float) -> str:
    if style < 0.5:
        return f"{body:,}".replace(",", ".") + "-" + check
    if style < 0.8:
        return f"{body}-{check}"
    if style < 0.9:
        return f"{body}{check}"
    return f"{body}-{check.lower()}"


# ---------------------------------------------------------------------------------------------
# Generation


def _dump(record: Mapping[str, Any]) -> bytes:
    # orjson hands back bytes inside a 4 KiB allocation; an exact copy keeps a million rows small.
    return memoryview(orjson.dumps(record)).tobytes()


class _FastRandom(random.Random):
    """``random.Random`` whose ``randrange`` and ``choice`` use one ``random()`` call each.

    The standard ones draw bits until a value fits, about ten times slower; for ranges far below
    2**53 the bias of scaling a float is negligible, and the stream stays seeded and repeatable.
    """

    def randrange(self, start: int, stop: int | None = None, step: int = 1) -> int:  # type: ignore[override]
        if stop is None:
            start, stop = 0, start
        return start + step * int(self.random() * ((stop - start) // step))

    def choice(self, seq: Sequence[T]) -> T:  # type: ignore[override]
        return seq[int(self.random() * len(seq))]


class _Weighted(Generic[T]):
    """Draws items by integer weight with one random number."""

    def __init__(self, items: Iterable[T], weights: Iterable[int]) -> None:
        self.items = list(items)
        self.cumulative = list(accumulate(weights))

    def pick(self, rng: random.Random) -> T:
        return self.items[bisect_right(self.cumulative, rng.randrange(self.cumulative[-1]))]


def _places(rows: tuple[tuple[str, int, str], ...]) -> _Weighted[tuple[str, tuple[str, ...]]]:
    return _Weighted(
        ((region, tuple(cities.split(", "))) for region, _, cities in rows),
        (weight for _, weight, _ in rows),
    )


class _Generator:
    """Draws clients from one seeded stream, so the dataset is a function of its parameters."""

    def __init__(self, seed: int, start_us: int, end_us: int) -> None:
        self.rng = _FastRandom(f"hermes-simulator:{seed}")
        self.start_us = start_us
        self.end_us = end_us
        self.today = us_to_datetime(end_us).date()
        # Clean emails are unique across the site, as a shop's login would make them.
        self.emails: set[str] = set()
        self.places = {
            "CL": _places(_CL_PLACES),
            "AR": _places(_AR_PLACES),
            "PE": _places(_PE_PLACES),
        }
        self.domains = _Weighted(*zip(*_EMAIL_DOMAINS, strict=True))

    # -- timestamps ---------------------------------------------------------------------------

    def stamp(self, micros: int, floor_us: int) -> tuple[str, int]:
        """Format an instant with a random offset and precision; the result stays >= floor_us."""
        rng = self.rng
        roll = rng.random()
        suffix, offset_us = _OFFSETS[0 if roll < 0.5 else 1 if roll < 0.8 else 2]
        roll = rng.random()
        digits = 0 if roll < 0.4 else 3 if roll < 0.75 else 6
        unit = 10 ** (6 - digits)
        instant = micros - micros % unit
        if instant < floor_us:
            digits, instant = 6, micros
        return format_rfc3339(instant, suffix, offset_us, digits), instant

    # -- one client ---------------------------------------------------------------------------

    def unique_email(self, first: str, paternal: str, maternal: str, birth_year: int) -> str:
        rng = self.rng
        f, p, m = _FOLDED[first], _FOLDED[paternal], _FOLDED[maternal]
        pattern = rng.randrange(6)
        if pattern == 0:
            local = f"{f}.{p}"
        elif pattern == 1:
            local = f"{f}{p}{rng.randrange(1, 100)}"
        elif pattern == 2:
            local = f"{f[0]}{p}"
        elif pattern == 3:
            local = f"{f}_{p}{birth_year % 100:02d}"
        elif pattern == 4:
            local = f"{p}.{f}"
        else:
            local = f"{f}.{p}{m[0]}"
        domain = self.domains.pick(rng)
        email = f"{local}@{domain}"
        while email in self.emails:
            email = f"{local}{rng.randrange(1, 10_000)}@{domain}"
        self.emails.add(email)
        return email

    def base_record(self, client_id: str) -> dict[str, Any]:
        rng = self.rng
        roll = rng.random()
        gender = "female" if roll < 0.5 else "male" if roll < 0.95 else "other"
        if roll > 0.97:
            gender = None
        first = rng.choice(_MALE_NAMES if gender == "male" else _FEMALE_NAMES)
        paternal, maternal = rng.choice(_SURNAMES), rng.choice(_SURNAMES)
        last_name = f"{paternal} {maternal}" if rng.random() < 0.6 else paternal
        age_days = int(rng.triangular(18, 82, 33) * 365.25)
        birth = self.today - timedelta(days=age_days)

        roll = rng.random()
        country = "CL" if roll < 0.94 else "AR" if roll < 0.97 else "PE"
        region, cities = self.places[country].pick(rng)
        city = rng.choice(cities)
        if country == "CL":
            # RUT bodies grow with the year of birth, roughly as they were issued.
            body = int((birth.year - 1925) * 280_000 + rng.uniform(-700_000, 700_000))
            body = min(max(body, 1_000_000), 27_999_999)
            document_type = "RUT"
            document_number = _format_rut(body, rut_check_digit(body), rng.random())
            digits = f"9{rng.choice('2458')}{rng.randrange(10_000_000):07d}"
            style = rng.random()
            if style < 0.4:
                phone = f"+56 9 {digits[1:5]} {digits[5:]}"
            elif style < 0.7:
                phone = digits
            else:
                phone = f"+56{digits}"
        else:
            number = rng.randrange(10_000_000, 48_000_000)
            document_type = "DNI" if rng.random() < 0.8 else "PASSPORT"
            document_number = str(number) if document_type == "DNI" else f"P{number}"
            if country == "AR":
                # Area code and subscriber number together have ten digits.
                area = _AR_AREA_CODES[city]
                unit = 10 ** (9 - len(area))
                local = str(rng.randrange(3 * unit, 7 * unit))
                phone = f"+54 9 {area} {local[:-4]}-{local[-4:]}"
            else:
                line = rng.randrange(10_000_000, 100_000_000)
                phone = f"+51 9{line // 1_000_000:02d} {line // 1000 % 1000:03d} {line % 1000:03d}"
        if rng.random() < 0.08:
            phone = None

        roll = rng.random()
        if roll < 0.65:
            custom_fields: dict[str, Any] | None = {
                "segmento": rng.choice(_SEGMENTS),
                "puntos": rng.randrange(0, 25_000, 10),
            }
            if rng.random() < 0.3:
                custom_fields["tienda_favorita"] = rng.choice(_STORES)
            if rng.random() < 0.2:
                custom_fields["cliente_frecuente"] = rng.random() < 0.5
        elif roll < 0.85:
            custom_fields = {}
        else:
            custom_fields = None

        roll = rng.random()
        return {
            "id": client_id,
            "email": self.unique_email(first, paternal, maternal, birth.year),
            "first_name": first,
            "last_name": last_name,
            "document_type": document_type,
            "document_number": document_number,
            "phone": phone,
            "birth_date": birth.isoformat() if rng.random() < 0.9 else None,
            "gender": gender,
            "country": country,
            "region": region,
            "city": city,
            "accepts_marketing": True if roll < 0.45 else False if roll < 0.85 else None,
            "created_at": None,
            "updated_at": None,
            "deleted_at": None,
            "custom_fields": custom_fields,
        }

    def dirty_kinds(self, record: dict[str, Any]) -> list[str]:
        """Pick one to three kinds of dirt that fit the record."""
        rng = self.rng
        groups: list[tuple[str, ...]] = [
            (INVALID_EMAIL, MISSING_EMAIL, UNNORMALIZED_EMAIL),
            (DUPLICATE,),
            (TOMBSTONE,),
            (UNKNOWN_PROPERTY,),
            (GARBAGE_PHONE,),
            (FUTURE_BIRTH_DATE, UNPARSEABLE_BIRTH_DATE),
            (COUNTRY_NAME,),
            (EMPTY_STRINGS,),
        ]
        if record["document_type"] == "RUT":
            groups.append((BAD_RUT_CHECK_DIGIT,))
        roll = rng.random()
        how_many = 1 if roll < 0.6 else 2 if roll < 0.9 else 3
        return [rng.choice(group) for group in rng.sample(groups, how_many)]

    def soil(self, record: dict[str, Any], kinds: list[str]) -> None:
        """Apply the field-level kinds of dirt to a record, in place."""
        rng = self.rng
        email: str = record["email"]
        local, _, domain = email.partition("@")
        if INVALID_EMAIL in kinds:
            how = rng.randrange(5)
            if how == 0:
                record["email"] = local + domain
            elif how == 1:
                record["email"] = f"{local[:2]} {local[2:]}@{domain}"
            elif how == 2:
                record["email"] = f"{local}@{domain.replace('.', '..', 1)}"
            elif how == 3:
                record["email"] = f"{local}@{domain.split('.')[0]}"
            else:
                record["email"] = f"{local}@@{domain}"
        elif MISSING_EMAIL in kinds:
            record["email"] = None if rng.random() < 0.6 else ""
        elif UNNORMALIZED_EMAIL in kinds:
            how = rng.randrange(3)
            if how == 0:
                record["email"] = email.upper()
            elif how == 1:
                record["email"] = f"  {email} "
            else:
                record["email"] = f" {local.title()}@{domain.upper()}"
        if BAD_RUT_CHECK_DIGIT in kinds:
            number: str = record["document_number"]
            check = number[-1].upper()
            wrong = rng.choice([d for d in "0123456789K" if d != check])
            record["document_number"] = number[:-1] + wrong
        if GARBAGE_PHONE in kinds:
            record["phone"] = rng.choice(_GARBAGE_PHONES)
        if FUTURE_BIRTH_DATE in kinds:
            future = self.today + timedelta(days=rng.randrange(1, 30_000))
            record["birth_date"] = future.isoformat()
        elif UNPARSEABLE_BIRTH_DATE in kinds:
            record["birth_date"] = rng.choice(_UNPARSEABLE_BIRTH_DATES)
        if COUNTRY_NAME in kinds:
            record["country"] = _COUNTRY_NAMES[record["country"]]
        if EMPTY_STRINGS in kinds:
            for field in rng.sample(("first_name", "last_name", "city", "region", "gender"), 2):
                record[field] = ""
        if UNKNOWN_PROPERTY in kinds:
            record["loyalty_tier"] = rng.choice(_LOYALTY_TIERS)
            if rng.random() < 0.5:
                record["referral_code"] = f"{rng.randrange(16**6):06X}"
            if rng.random() < 0.3:
                record["tags"] = rng.sample(["vip", "mayorista", "empleado", "b2b"], 2)

    def versions(self, index: int, dirty: bool) -> tuple[list[tuple[int, str, bytes]], list[str]]:
        """All versions of one client as (instant, id, JSON bytes), and its kinds of dirt."""
        rng = self.rng
        client_id = f"{10_000_000 + index}"
        record = self.base_record(client_id)
        kinds = self.dirty_kinds(record) if dirty else []
        self.soil(record, kinds)

        newest_raw = rng.randrange(self.start_us, self.end_us)
        newest_text, newest = self.stamp(newest_raw, self.start_us)
        two_versions = DUPLICATE in kinds or (TOMBSTONE in kinds and rng.random() < 0.5)
        if two_versions and newest <= self.start_us:
            two_versions = False  # no room for an older version inside the window
            if DUPLICATE in kinds:
                kinds.remove(DUPLICATE)
                if not kinds:
                    kinds.append(UNKNOWN_PROPERTY)
                    self.soil(record, [UNKNOWN_PROPERTY])
        if TOMBSTONE in kinds and two_versions and DUPLICATE not in kinds:
            kinds.append(DUPLICATE)

        first_raw = rng.randrange(self.start_us, newest) if two_versions else newest
        created_raw = first_raw - rng.randrange(0, 4 * 365 * 86_400 * _US_PER_SECOND)
        record["created_at"] = self.stamp(created_raw, created_raw)[0]

        out: list[tuple[int, str, bytes]] = []
        if two_versions:
            older_text, older = self.stamp(first_raw, self.start_us)
            older_record = dict(record, updated_at=older_text)
            out.append((older, client_id, _dump(older_record)))
            # The newer version changed something a person would change.
            email_kind = {INVALID_EMAIL, MISSING_EMAIL, UNNORMALIZED_EMAIL} & set(kinds)
            if TOMBSTONE not in kinds and not email_kind and rng.random() < 0.5:
                record["email"] = self.unique_email(
                    record["first_name"] or "José",
                    (record["last_name"] or "Soto").split(" ")[0],
                    (record["last_name"] or "Soto").split(" ")[-1],
                    rng.randrange(1950, 2005),
                )
                kinds.append(CHANGED_EMAIL)
            else:
                record["accepts_marketing"] = not record["accepts_marketing"]
        record["updated_at"] = newest_text
        if TOMBSTONE in kinds:
            record["deleted_at"] = newest_text
            # Wiping personal data would hide the field-level dirt, so only clean fields go.
            if not _WIPED_KINDS.intersection(kinds) and rng.random() < 0.5:
                kinds.append(TOMBSTONE_WITHOUT_EMAIL)
                for field in ("email", "phone", "document_number", "birth_date"):
                    record[field] = None
        out.append((newest, client_id, _dump(record)))
        return out, kinds


def generate_versions(
    *, clients: int, seed: int, start_us: int, end_us: int, dirty_share: float
) -> tuple[list[tuple[int, str, bytes]], dict[str, tuple[str, ...]]]:
    """Generate every version of ``clients`` clients, unsorted, and the kinds of each dirty one.

    ``updated_at`` of every version lies in ``[start_us, end_us)``. Exactly
    ``round(dirty_share * clients)`` clients are dirty.
    """
    generator = _Generator(seed, start_us, end_us)
    flags = bytearray(clients)
    for index in generator.rng.sample(range(clients), round(dirty_share * clients)):
        flags[index] = 1
    versions: list[tuple[int, str, bytes]] = []
    dirty: dict[str, tuple[str, ...]] = {}
    for index in range(clients):
        client_versions, kinds = generator.versions(index, bool(flags[index]))
        versions.extend(client_versions)
        if kinds:
            dirty[client_versions[0][1]] = tuple(kinds)
    return versions, dirty


# ---------------------------------------------------------------------------------------------
# The dataset


class ClientDataset:
    """Every version of every client the site lists, in listing order (updated_at instant, then id).

    Ids are compared as text (generated ids are eight digits, so text and numeric order agree).
    Rows are kept as JSON bytes; ``window`` decodes on demand. ``dirty`` maps the id of each dirty
    client to its kinds of dirt (see ``DIRTY_KINDS``), so tests know the data without the server.
    """

    def __init__(self, config: SimulatorConfig) -> None:
        assert config.start is not None and config.end is not None  # resolved by the config
        self.start: datetime = config.start
        self.end: datetime = config.end
        versions, dirty = generate_versions(
            clients=config.clients,
            seed=config.seed,
            start_us=datetime_to_us(config.start),
            end_us=datetime_to_us(config.end),
            dirty_share=config.dirty_share,
        )
        versions.sort()  # (instant, id): versions of one client never share an instant
        self._instants = array("q", [version[0] for version in versions])
        self._rows: list[bytes] = [version[2] for version in versions]
        self.dirty: Mapping[str, tuple[str, ...]] = MappingProxyType(dirty)
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._rows)

    def _bounds(self, since_us: int, until_us: int) -> tuple[int, int]:
        return bisect_left(self._instants, since_us), bisect_left(self._instants, until_us)

    def page(
        self, since_us: int, until_us: int, offset: int, limit: int
    ) -> tuple[list[bytes], int]:
        """The rows ``offset .. offset+limit`` of the window, and how many rows the window holds."""
        with self._lock:
            low, high = self._bounds(since_us, until_us)
            first = low + offset
            return self._rows[first : min(high, first + limit)], high - low

    def count(self, since: datetime, until: datetime) -> int:
        """How many versions /clients lists for ``[since, until)``."""
        with self._lock:
            low, high = self._bounds(datetime_to_us(since), datetime_to_us(until))
        return max(0, high - low)

    def window(self, since: datetime, until: datetime) -> list[dict[str, Any]]:
        """Exactly the records /clients serves for ``[since, until)``, in order, decoded."""
        with self._lock:
            low, high = self._bounds(datetime_to_us(since), datetime_to_us(until))
            rows = self._rows[low:high]
        return [orjson.loads(row) for row in rows]

    def latest(self, since: datetime, until: datetime) -> dict[str, dict[str, Any]]:
        """The newest version of each client listed in ``[since, until)``, by id.

        This is what a consumer holds after deduplicating the window by id.
        """
        return {record["id"]: record for record in self.window(since, until)}

    def add_records(self, records: Iterable[Mapping[str, Any]]) -> None:
        """Insert extra versions (a changed email, a deletion...) at their place in the listing.

        Raises:
            ValueError: a record has no string ``id`` or no RFC 3339 ``updated_at``, or cannot be
                serialized to JSON.
        """
        prepared: list[tuple[int, str, bytes]] = []
        for position, record in enumerate(records):
            if not isinstance(record, Mapping):
                raise ValueError(f"record {position} is a {type(record).__name__}, not a mapping")
            client_id, updated_at = record.get("id"), record.get("updated_at")
            if not isinstance(client_id, str) or not client_id:
                raise ValueError(f"record {position} needs a non-empty string 'id'")
            if not isinstance(updated_at, str):
                raise ValueError(f"record {position} ({client_id}) needs a string 'updated_at'")
            try:
                instant = parse_rfc3339_us(updated_at)
                row = _dump(dict(record))
            except (ValueError, TypeError) as err:
                raise ValueError(f"record {position} ({client_id}): {err}") from err
            prepared.append((instant, client_id, row))
        with self._lock:
            for instant, client_id, row in prepared:
                position = bisect_left(self._instants, instant)
                end = bisect_right(self._instants, instant)
                # Equal instants are ordered by id; a new version of the same id goes last.
                while position < end and orjson.loads(self._rows[position])["id"] <= client_id:
                    position += 1
                self._instants.insert(position, instant)
                self._rows.insert(position, row)

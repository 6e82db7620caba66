"""A bundled Hermes site: a real HTTP server on loopback that implements the Clients API contract.

It serves ``GET /api/v1/verify`` and ``GET /api/v1/clients`` exactly as
``hermes-api/openapi.yaml`` describes them, over HTTP/1.1 with keep-alive, from a deterministic
dataset of realistic (and partly dirty) Chilean clients (see ``simulator_data``). Faults that a
real site shows (5xx answers, some of them not JSON; 429 with ``Retry-After``; dropped
connections; truncated bodies; latency; expiring cursors) can be switched on, also while running.

Readings of the contract that the simulator makes:

- A known token without ``clients:read`` gets 403 ``insufficient_scope`` from ``/clients``, but
  ``/verify`` answers 200 and lists the token's scopes: verifying a token is not reading clients,
  so whether a token that cannot read clients is acceptable is the consumer's decision.
- ``updated_since`` and ``updated_until`` must carry an explicit offset; a naive time is a 400.
  Bounds are compared as instants, so ``...T00:00:00Z`` and ``...T21:00:00-03:00`` (the day
  before) are the same bound, and a cursor stays valid when a bound is re-sent in another offset.
- A cursor is an offset into the window, signed together with the window, the limit and the time
  it was issued. A version inserted before the offset while a window is paged through makes one
  row appear twice, never a gap; the contract asks consumers to deduplicate by ``id``.
- The rate limit is a token bucket per token holding one second of requests. It applies once a
  request is authenticated, so 401 and 404 answers (and injected faults) do not count.
- Faults come before the API: a dropped or 5xx request never reached authentication. Unknown query
  parameters are ignored (forward compatibility), repeated ones are a 400.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import hmac
import logging
import random
import re
import signal
import socket
import struct
import threading
import time
import uuid
from base64 import urlsafe_b64decode, urlsafe_b64encode
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import MappingProxyType
from typing import Any
from urllib.parse import parse_qs, urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import orjson

from hermes_orchestration.simulator_data import (
    DIRTY_KINDS,
    ClientDataset,
    parse_rfc3339_us,
)

__all__ = [
    "API_PREFIX",
    "DIRTY_KINDS",
    "DROPPED",
    "SCOPE_CLIENTS_READ",
    "ClientDataset",
    "Faults",
    "HermesSimulator",
    "RequestStats",
    "SimulatorConfig",
    "add_cli_arguments",
    "config_from_args",
]

logger = logging.getLogger(__name__)

API_PREFIX = "/api/v1"
SCOPE_CLIENTS_READ = "clients:read"
DEFAULT_LIMIT = 100
MAX_LIMIT = 1000
DEFAULT_TOKEN = "demo-token"
# The scopes of a token made with --token-without-scope: valid, but unable to read clients.
SCOPES_WITHOUT_CLIENTS: tuple[str, ...] = ("orders:read",)
# The status recorded in RequestStats for a request whose connection was closed unanswered.
DROPPED = 0

_VERIFY_PATH = f"{API_PREFIX}/verify"
_CLIENTS_PATH = f"{API_PREFIX}/clients"
_SERVER_ERRORS = (500, 502, 503, 504)


def _share(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a share from 0 to 1, got {value!r}")


@dataclass(frozen=True)
class Faults:
    """Failures the simulated site injects; all off by default."""

    error_rate: float = 0.0  # share of requests answered 500/502/503/504, some without JSON
    rate_limit_per_second: float | None = None  # per token; past it 429 with Retry-After
    retry_after_seconds: int = 1  # the Retry-After value sent with 429 (whole seconds, may be 0)
    latency_seconds: float = 0.0  # added before every response
    drop_rate: float = 0.0  # share of requests whose connection is closed with no response
    truncated_rate: float = 0.0  # share of /clients 200 answers whose JSON body is cut short
    cursor_ttl_seconds: float | None = None  # older cursors get 400 bad_request

    def __post_init__(self) -> None:
        _share("error_rate", self.error_rate)
        _share("drop_rate", self.drop_rate)
        _share("truncated_rate", self.truncated_rate)
        if self.rate_limit_per_second is not None and not self.rate_limit_per_second > 0:
            raise ValueError(
                f"rate_limit_per_second must be positive or None (no limit), "
                f"got {self.rate_limit_per_second!r}"
            )
        if isinstance(self.retry_after_seconds, bool) or not isinstance(
            self.retry_after_seconds, int
        ):
            raise ValueError(
                f"retry_after_seconds must be a whole number, got {self.retry_after_seconds!r}"
            )
        if self.retry_after_seconds < 0:
            raise ValueError(f"retry_after_seconds must be >= 0, got {self.retry_after_seconds}")
        if not self.latency_seconds >= 0:
            raise ValueError(f"latency_seconds must be >= 0, got {self.latency_seconds!r}")
        if self.cursor_ttl_seconds is not None and not self.cursor_ttl_seconds > 0:
            raise ValueError(
                f"cursor_ttl_seconds must be positive or None (cursors never expire), "
                f"got {self.cursor_ttl_seconds!r}"
            )


def _default_tokens() -> Mapping[str, tuple[str, ...]]:
    return MappingProxyType({DEFAULT_TOKEN: (SCOPE_CLIENTS_READ,)})


@dataclass(frozen=True)
class SimulatorConfig:
    """What the simulated site holds and how it behaves.

    ``start`` and ``end`` bound the ``updated_at`` of the dataset; left out, ``end`` is now (UTC,
    rounded down to the minute) and ``start`` seven days before it. The dataset is a function of
    (seed, clients, start, end, dirty_share). Tokens map an App Token to its scopes and are kept
    out of the repr.
    """

    clients: int = 1000
    seed: int = 7
    start: datetime | None = None
    end: datetime | None = None
    dirty_share: float = 0.1
    tokens: Mapping[str, tuple[str, ...]] = field(
        default_factory=_default_tokens, repr=False, hash=False
    )
    site_name: str = "Tienda Demo"
    timezone: str = "America/Santiago"
    faults: Faults = field(default_factory=Faults)

    def __post_init__(self) -> None:
        if isinstance(self.clients, bool) or not isinstance(self.clients, int) or self.clients < 0:
            raise ValueError(f"clients must be a whole number >= 0, got {self.clients!r}")
        _share("dirty_share", self.dirty_share)
        for name in ("start", "end"):
            value = getattr(self, name)
            if value is not None and (value.tzinfo is None or value.utcoffset() is None):
                raise ValueError(
                    f"{name} {value.isoformat()} has no timezone; give an aware datetime "
                    "(e.g. 2024-05-01T00:00:00+00:00)"
                )
        end = self.end
        if end is None:
            end = datetime.now(UTC).replace(second=0, microsecond=0)
        start = self.start if self.start is not None else end - timedelta(days=7)
        if not start < end:
            raise ValueError(f"start ({start.isoformat()}) must be before end ({end.isoformat()})")
        object.__setattr__(self, "start", start)
        object.__setattr__(self, "end", end)
        tokens: dict[str, tuple[str, ...]] = {}
        for token, scopes in self.tokens.items():
            if not isinstance(token, str) or not token or token != token.strip():
                raise ValueError("every token must be a non-empty string without outer spaces")
            if isinstance(scopes, str):
                raise ValueError("the scopes of a token must be a tuple of strings, not a string")
            tokens[token] = tuple(scopes)
        object.__setattr__(self, "tokens", MappingProxyType(tokens))
        try:
            ZoneInfo(self.timezone)
        except (ZoneInfoNotFoundError, ValueError) as err:
            raise ValueError(
                f"timezone {self.timezone!r} is not an IANA time zone (e.g. America/Santiago)"
            ) from err
        if not isinstance(self.faults, Faults):
            raise ValueError(f"faults must be a Faults, got {type(self.faults).__name__}")


class RequestStats:
    """Thread-safe counts of answered requests by (path, status); dropped ones have status 0."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: Counter[tuple[str, int]] = Counter()

    def record(self, path: str, status: int) -> None:
        """Count one request."""
        with self._lock:
            self._counts[(path, status)] += 1

    def count(self, path: str | None = None, status: int | None = None) -> int:
        """Requests to ``path`` (any if None) answered ``status`` (any if None)."""
        with self._lock:
            return sum(
                n
                for (p, s), n in self._counts.items()
                if (path is None or p == path) and (status is None or s == status)
            )

    @property
    def total(self) -> int:
        """All requests counted so far."""
        return self.count()

    def snapshot(self) -> dict[tuple[str, int], int]:
        """A copy of the counts."""
        with self._lock:
            return dict(self._counts)

    def reset(self) -> None:
        """Forget every count."""
        with self._lock:
            self._counts.clear()


# ---------------------------------------------------------------------------------------------
# Protocol pieces


class _ApiError(Exception):
    """An answer with a JSON error body."""

    def __init__(
        self, status: int, code: str, message: str, headers: tuple[tuple[str, str], ...] = ()
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers


def _bad_request(message: str) -> _ApiError:
    return _ApiError(400, "bad_request", message)


class _CursorCodec:
    """Opaque cursors: offset, fingerprint of the other parameters and issue time, signed."""

    _LAYOUT = struct.Struct("!BQQ8s")  # version, offset, issued (ms since epoch), fingerprint
    _VERSION = 1
    _MAC_SIZE = 12

    def __init__(self, key: bytes) -> None:
        self._key = key

    def fingerprint(self, since_us: int, until_us: int, limit: int) -> bytes:
        text = f"{since_us}|{until_us}|{limit}".encode()
        return hashlib.blake2b(text, key=self._key, digest_size=8).digest()

    def _mac(self, payload: bytes) -> bytes:
        return hashlib.blake2b(payload, key=self._key, digest_size=self._MAC_SIZE).digest()

    def encode(self, offset: int, fingerprint: bytes, issued_at: float) -> str:
        payload = self._LAYOUT.pack(self._VERSION, offset, int(issued_at * 1000), fingerprint)
        return urlsafe_b64encode(payload + self._mac(payload)).rstrip(b"=").decode()

    def decode(self, cursor: str) -> tuple[int, bytes, float]:
        """Return (offset, fingerprint, issued_at); raise ``_ApiError`` if garbled or unknown."""
        garbled = _bad_request(
            "cursor is unknown or garbled: pass the next_cursor of the previous page unchanged, "
            "or leave cursor out to list the window from its first page"
        )
        try:
            raw = urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        except ValueError:
            raise garbled from None
        payload, mac = raw[: self._LAYOUT.size], raw[self._LAYOUT.size :]
        if len(payload) != self._LAYOUT.size or not hmac.compare_digest(mac, self._mac(payload)):
            raise garbled
        version, offset, issued_ms, fingerprint = self._LAYOUT.unpack(payload)
        if version != self._VERSION:
            raise garbled
        return offset, fingerprint, issued_ms / 1000


class _RateLimiter:
    """A token bucket per App Token that holds one second of requests."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._buckets: dict[str, tuple[float, float]] = {}

    def allow(self, key: str, rate: float) -> bool:
        now = time.monotonic()
        capacity = max(1.0, rate)
        with self._lock:
            level, last = self._buckets.get(key, (capacity, now))
            level = min(capacity, level + (now - last) * rate)
            allowed = level >= 1.0
            self._buckets[key] = (level - 1.0 if allowed else level, now)
            return allowed


_TIMESTAMP_HINT = "an RFC 3339 timestamp with an explicit offset, e.g. 2024-05-01T00:00:00-04:00"
_SPACE_FOR_PLUS = re.compile(r"\d{2}:\d{2}(?:\.\d+)? \d{2}:\d{2}$")


def _parse_bound(name: str, value: str | None) -> int:
    if value is None or value == "":
        raise _bad_request(f"{name} is required: {_TIMESTAMP_HINT}")
    try:
        return parse_rfc3339_us(value)
    except ValueError as err:
        hint = ""
        if _SPACE_FOR_PLUS.search(value):
            hint = " (a '+' in a query string must be percent-encoded as %2B)"
        raise _bad_request(f"{name}: {err}{hint}") from None


def _parse_limit(value: str | None) -> int:
    if value is None:
        return DEFAULT_LIMIT
    if not value.isascii() or not value.isdigit() or not 1 <= int(value) <= MAX_LIMIT:
        raise _bad_request(f"limit must be a whole number from 1 to {MAX_LIMIT}, got {value!r}")
    return int(value)


def _error_body(code: str, message: str) -> bytes:
    return orjson.dumps({"error": {"code": code, "message": message}})


# Bodies of injected 5xx answers: JSON, HTML from a proxy, or nothing at all.
_HTML_ERROR = (
    b"<html><head><title>{status} {phrase}</title></head><body><center><h1>{status} {phrase}"
    b"</h1></center><hr><center>nginx</center></body></html>"
)


@dataclass(frozen=True)
class _Fate:
    """What the injected faults do to one request, drawn up front."""

    drop: bool
    error_status: int | None
    error_body: str  # "json", "html" or "empty"
    truncate: bool
    cut: float  # where to cut a truncated body, as a share of its length


# ---------------------------------------------------------------------------------------------
# The server


class _Site:
    """The state that request handlers share: dataset, faults, tokens, counters."""

    def __init__(self, config: SimulatorConfig, dataset: ClientDataset, url: str) -> None:
        self.config = config
        self.dataset = dataset
        self.url = url
        self.faults = config.faults
        self.stats = RequestStats()
        self.limiter = _RateLimiter()
        # Keyed by the seed, so a restarted simulator accepts the cursors of its predecessor.
        self.cursors = _CursorCodec(hashlib.sha256(f"cursor:{config.seed}".encode()).digest())
        self._rng = random.Random(f"faults:{config.seed}")
        self._rng_lock = threading.Lock()

    def fate(self, faults: Faults) -> _Fate:
        # A fixed number of draws per request keeps a single-threaded run repeatable.
        with self._rng_lock:
            drop, error, status, body, truncate, cut = (self._rng.random() for _ in range(6))
        return _Fate(
            drop=drop < faults.drop_rate,
            error_status=_SERVER_ERRORS[int(status * 4)] if error < faults.error_rate else None,
            error_body="json" if body < 0.4 else "html" if body < 0.8 else "empty",
            truncate=truncate < faults.truncated_rate,
            cut=cut,
        )


class _Handler(BaseHTTPRequestHandler):
    """Answers one connection's requests (HTTP/1.1 keep-alive)."""

    protocol_version = "HTTP/1.1"
    server_version = "HermesSimulator/1.0"
    sys_version = ""
    disable_nagle_algorithm = True
    timeout = 120  # an idle keep-alive connection is closed after this many seconds

    server: _Server
    request_id: str = ""
    _path: str = ""

    # -- plumbing -----------------------------------------------------------------------------

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("%s %s", self.address_string(), format % args)

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        # The request line holds the path and query, never the Authorization header.
        logger.debug('"%s" %s request_id=%s', self.requestline, code, self.request_id)

    def _send(
        self,
        status: int,
        body: bytes,
        content_type: str | None = "application/json",
        headers: tuple[tuple[str, str], ...] = (),
    ) -> None:
        # Counted before answering, so a client that has seen the answer also sees it counted.
        self.server.site.stats.record(self._path or "-", status)
        self.send_response(status)
        if content_type is not None:
            self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Request-Id", self.request_id or uuid.uuid4().hex)
        for name, value in headers:
            self.send_header(name, value)
        if self.close_connection:
            # Tell the client not to reuse a connection that is about to close.
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)

    def _send_error_json(self, error: _ApiError) -> None:
        self._send(error.status, _error_body(error.code, error.message), headers=error.headers)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """Malformed requests rejected by the base class get a JSON body and a request id too."""
        try:
            phrase = HTTPStatus(code).phrase
        except ValueError:
            phrase = "Error"
        text = f"{phrase}: {message}" if message else phrase
        # Only the base class calls this, before do_GET: the request has no id or path yet.
        self.request_id = uuid.uuid4().hex
        self._path = "-"
        self.close_connection = True
        # A request line too broken to name its version would get a bare HTTP/0.9 answer, which
        # no client reads; answer it in HTTP/1.1 with headers instead.
        self.request_version = self.protocol_version
        self._send(code, _error_body("bad_request" if code < 500 else "unavailable", text))

    # -- requests -----------------------------------------------------------------------------

    def do_GET(self) -> None:
        site = self.server.site
        self.request_id = uuid.uuid4().hex
        target = urlsplit(self.path)
        self._path = target.path
        faults = site.faults
        fate = site.fate(faults)
        if faults.latency_seconds:
            time.sleep(faults.latency_seconds)
        if fate.drop:
            site.stats.record(self._path, DROPPED)
            logger.debug("dropping %s request_id=%s", self._path, self.request_id)
            self.close_connection = True
            return
        if fate.error_status is not None:
            self._send_injected_error(fate)
            return
        try:
            self._route(site, faults, fate, target.query)
        except _ApiError as error:
            self._send_error_json(error)
        except OSError:
            # The client hung up mid-answer (a timeout, a cancelled sync): nothing to answer.
            logger.debug("client left %s request_id=%s", self._path, self.request_id)
            self.close_connection = True
        except Exception:
            logger.exception("simulator failed on %s request_id=%s", self._path, self.request_id)
            self.close_connection = True
            self._send(500, _error_body("internal", "the simulator failed; see its log"))

    def _not_allowed(self) -> None:
        self.request_id = uuid.uuid4().hex
        self._path = urlsplit(self.path).path
        self.close_connection = True  # a request body, if any, is never read
        self._send(
            405,
            _error_body(
                "method_not_allowed", f"{self.command} is not allowed; the API is GET-only"
            ),
            headers=(("Allow", "GET"),),
        )

    do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = _not_allowed

    def _send_injected_error(self, fate: _Fate) -> None:
        status = fate.error_status or 503
        phrase = HTTPStatus(status).phrase
        if fate.error_body == "json":
            body = _error_body("unavailable", f"{phrase}: the site is briefly unavailable")
            self._send(status, body)
        elif fate.error_body == "html":
            body = _HTML_ERROR.replace(b"{status}", str(status).encode()).replace(
                b"{phrase}", phrase.encode()
            )
            self._send(status, body, content_type="text/html")
        else:
            self._send(status, b"", content_type=None)

    def _route(self, site: _Site, faults: Faults, fate: _Fate, query: str) -> None:
        if self._path not in (_VERIFY_PATH, _CLIENTS_PATH):
            raise _ApiError(
                404,
                "not_found",
                f"no endpoint at {self._path}; the API serves GET {_VERIFY_PATH} "
                f"and GET {_CLIENTS_PATH}",
            )
        token, scopes = self._authenticate(site)
        if faults.rate_limit_per_second is not None and not site.limiter.allow(
            token, faults.rate_limit_per_second
        ):
            raise _ApiError(
                429,
                "rate_limited",
                f"too many requests: at most {faults.rate_limit_per_second:g} per second per "
                f"token; retry after {faults.retry_after_seconds} s",
                headers=(("Retry-After", str(faults.retry_after_seconds)),),
            )
        if self._path == _VERIFY_PATH:
            self._send(200, self._verification(site, scopes))
            return
        if SCOPE_CLIENTS_READ not in scopes:
            raise _ApiError(
                403,
                "insufficient_scope",
                f"this App Token lacks the {SCOPE_CLIENTS_READ} scope; issue a token with it "
                "in the site's admin",
                headers=(
                    (
                        "WWW-Authenticate",
                        f'Bearer error="insufficient_scope", scope="{SCOPE_CLIENTS_READ}"',
                    ),
                ),
            )
        body = self._clients_page(site, faults, query)
        if fate.truncate:
            body = body[: max(1, min(len(body) - 1, int(len(body) * fate.cut)))]
        self._send(200, body)

    def _authenticate(self, site: _Site) -> tuple[str, tuple[str, ...]]:
        challenge = (("WWW-Authenticate", 'Bearer error="invalid_token"'),)
        header = self.headers.get("Authorization")
        if header is None:
            raise _ApiError(
                401,
                "invalid_token",
                "missing Authorization header; send 'Authorization: Bearer <App Token>'",
                challenge,
            )
        scheme, _, token = header.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token or " " in token:
            raise _ApiError(
                401,
                "invalid_token",
                "malformed Authorization header; expected 'Bearer <App Token>'",
                challenge,
            )
        scopes = site.config.tokens.get(token)
        if scopes is None:
            raise _ApiError(
                401,
                "invalid_token",
                "the App Token is not valid for this site (unknown, revoked or expired)",
                challenge,
            )
        return token, scopes

    def _verification(self, site: _Site, scopes: tuple[str, ...]) -> bytes:
        return orjson.dumps(
            {
                "site": {
                    "name": site.config.site_name,
                    "url": site.url,
                    "timezone": site.config.timezone,
                },
                "token": {"scopes": list(scopes), "expires_at": None},
            }
        )

    def _clients_page(self, site: _Site, faults: Faults, query: str) -> bytes:
        params = parse_qs(query, keep_blank_values=True)

        def single(name: str) -> str | None:
            values = params.get(name)
            if not values:
                return None
            if len(values) > 1:
                raise _bad_request(f"{name} is given {len(values)} times; give it once")
            return values[0]

        since_us = _parse_bound("updated_since", single("updated_since"))
        until_us = _parse_bound("updated_until", single("updated_until"))
        if since_us >= until_us:
            raise _bad_request(
                f"the window is empty or reversed: updated_since ({single('updated_since')}) "
                f"must be before updated_until ({single('updated_until')})"
            )
        limit = _parse_limit(single("limit"))
        fingerprint = site.cursors.fingerprint(since_us, until_us, limit)
        cursor = single("cursor")
        offset = 0
        now = time.time()
        if cursor is not None:
            offset, issued_for, issued_at = site.cursors.decode(cursor)
            if not hmac.compare_digest(issued_for, fingerprint):
                raise _bad_request(
                    "cursor was issued for other parameters: repeat updated_since, "
                    "updated_until and limit unchanged with it, or leave cursor out to start over"
                )
            ttl = faults.cursor_ttl_seconds
            if ttl is not None and now - issued_at > ttl:
                raise _bad_request(
                    f"cursor expired: issued {now - issued_at:.0f} s ago, cursors last "
                    f"{ttl:g} s; list the window again from its first page"
                )
        rows, total = site.dataset.page(since_us, until_us, offset, limit)
        next_offset = offset + len(rows)
        next_cursor = (
            site.cursors.encode(next_offset, fingerprint, now) if next_offset < total else None
        )
        return b"".join(
            (b'{"data":[', b",".join(rows), b'],"next_cursor":', orjson.dumps(next_cursor), b"}")
        )


class _Server(ThreadingHTTPServer):
    """A threading HTTP server that can close its keep-alive connections when stopped."""

    daemon_threads = True
    allow_reuse_address = True

    site: _Site  # set by HermesSimulator before it serves

    def __init__(self, address: tuple[str, int]) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)
        self._open: set[socket.socket] = set()
        self._open_lock = threading.Lock()

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._open_lock:
            self._open.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._open_lock:
            self._open.discard(request)
        super().shutdown_request(request)

    def close_open_connections(self) -> None:
        with self._open_lock:
            requests, self._open = list(self._open), set()
        for request in requests:
            with contextlib.suppress(OSError):  # already closed by the peer
                request.shutdown(socket.SHUT_RDWR)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that hangs up mid-answer is normal (timeouts, cancelled syncs), not an error.
        logger.debug("connection from %s ended abruptly", client_address, exc_info=True)


class HermesSimulator:
    """A Hermes site on a loopback port, serving the Clients API from a generated dataset.

    The socket is bound on construction (so ``url`` is known, also with port 0); ``start`` serves
    in a background thread, ``serve_forever`` in the calling one.
    """

    def __init__(self, config: SimulatorConfig, host: str = "127.0.0.1", port: int = 0) -> None:
        self.config = config
        self.dataset = ClientDataset(config)
        self._server = _Server((host, port))
        bound_host, bound_port = self._server.server_address[:2]
        shown = "127.0.0.1" if bound_host in ("0.0.0.0", "") else str(bound_host)
        shown = f"[{shown}]" if ":" in shown else shown
        self.url = f"http://{shown}:{bound_port}"
        self._server.site = _Site(config, self.dataset, self.url)
        self._thread: threading.Thread | None = None
        self._stopped = threading.Event()

    @property
    def api_url(self) -> str:
        """The base URL of the API, ``{url}/api/v1``."""
        return f"{self.url}{API_PREFIX}"

    @property
    def stats(self) -> RequestStats:
        """Counts of the requests answered so far, by (path, status)."""
        return self._server.site.stats

    @property
    def faults(self) -> Faults:
        """The faults in force."""
        return self._server.site.faults

    def set_faults(self, faults: Faults) -> None:
        """Change the injected faults; requests that arrive from now on see them."""
        if not isinstance(faults, Faults):
            raise TypeError(f"set_faults takes a Faults, got {type(faults).__name__}")
        self._server.site.faults = faults
        logger.info("simulator faults now %s", faults)

    def start(self) -> HermesSimulator:
        """Serve in a background daemon thread; returns self."""
        if self._stopped.is_set():
            raise RuntimeError("this simulator was stopped; create a new one")
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._server.serve_forever,
                kwargs={"poll_interval": 0.1},
                name=f"hermes-simulator-{self._server.server_address[1]}",
                daemon=True,
            )
            self._thread.start()
            logger.info(
                "Hermes simulator %r serving %d client versions at %s",
                self.config.site_name,
                len(self.dataset),
                self.api_url,
            )
        return self

    def stop(self) -> None:
        """Stop serving, close open connections and release the port. Idempotent."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join()
        self._server.close_open_connections()
        self._server.server_close()
        logger.info("Hermes simulator at %s stopped", self.url)

    def serve_forever(self) -> None:
        """Serve until Ctrl-C or SIGTERM, then stop cleanly (for the command line)."""
        done = threading.Event()
        previous: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                previous[signum] = signal.signal(signum, lambda *_: done.set())
        try:
            self.start()
            while not done.wait(0.5):
                pass
        except KeyboardInterrupt:
            pass
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            self.stop()

    def __enter__(self) -> HermesSimulator:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"HermesSimulator(url={self.url!r}, versions={len(self.dataset)})"


# ---------------------------------------------------------------------------------------------
# Command line


def _aware_datetime(text: str) -> datetime:
    try:
        value = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an ISO 8601 date and time (e.g. 2024-05-01T00:00:00-04:00)"
        ) from None
    if value.tzinfo is None:
        raise argparse.ArgumentTypeError(f"{text!r} has no UTC offset; add Z or ±hh:mm")
    return value


def _number(kind: type, low: float | None = None, high: float | None = None) -> Any:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            noun = "whole number" if kind is int else "number"
            raise argparse.ArgumentTypeError(f"{text!r} is not a {noun}") from None
        if (low is not None and value < low) or (high is not None and value > high):
            bounds = f"from {low:g}" + (f" to {high:g}" if high is not None else "")
            raise argparse.ArgumentTypeError(f"{text!r} is out of range: expected {bounds}")
        return value

    return parse


def _positive(text: str) -> float:
    value = _number(float, 0.0)(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be greater than 0")
    return value


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options of ``hermes-orchestration simulate`` to ``parser``."""
    site = parser.add_argument_group("simulated site")
    site.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    site.add_argument("--port", type=_number(int, 0, 65535), default=8765, help="default 8765")
    site.add_argument("--clients", type=_number(int, 0), default=1000, help="default 1000")
    site.add_argument("--seed", type=int, default=7, help="dataset seed (default 7)")
    site.add_argument(
        "--token",
        action="append",
        metavar="TOKEN",
        help=f"an App Token with the {SCOPE_CLIENTS_READ} scope; repeatable "
        f"(default {DEFAULT_TOKEN})",
    )
    site.add_argument(
        "--token-without-scope",
        action="append",
        metavar="TOKEN",
        help=f"a valid App Token without {SCOPE_CLIENTS_READ} (its /clients answer is 403)",
    )
    site.add_argument("--dirty-share", type=_number(float, 0, 1), default=0.1, help="default 0.1")
    site.add_argument("--start", type=_aware_datetime, help="earliest updated_at (ISO 8601)")
    site.add_argument("--end", type=_aware_datetime, help="updated_at bound (default: now)")
    site.add_argument("--site-name", default="Tienda Demo")
    site.add_argument("--timezone", default="America/Santiago")
    faults = parser.add_argument_group("injected faults")
    faults.add_argument("--error-rate", type=_number(float, 0, 1), default=0.0)
    faults.add_argument(
        "--rate-limit", type=_positive, metavar="PER_SECOND", help="requests per second per token"
    )
    faults.add_argument("--retry-after", type=_number(int, 0), default=1, metavar="SECONDS")
    faults.add_argument("--latency", type=_number(float, 0), default=0.0, metavar="SECONDS")
    faults.add_argument("--drop-rate", type=_number(float, 0, 1), default=0.0)
    faults.add_argument("--truncated-rate", type=_number(float, 0, 1), default=0.0)
    faults.add_argument("--cursor-ttl", type=_positive, metavar="SECONDS")


def config_from_args(args: argparse.Namespace) -> tuple[SimulatorConfig, str, int]:
    """Build (config, host, port) from options added by ``add_cli_arguments``.

    Raises:
        ValueError: the options contradict each other (e.g. start after end, a token given both
            with and without scope); the message names the options.
    """
    with_scope = list(args.token or [DEFAULT_TOKEN])
    without_scope = list(args.token_without_scope or [])
    if set(with_scope) & set(without_scope):
        raise ValueError("a token is given both with --token and --token-without-scope")
    tokens = {token: (SCOPE_CLIENTS_READ,) for token in with_scope}
    tokens.update({token: SCOPES_WITHOUT_CLIENTS for token in without_scope})
    faults = Faults(
        error_rate=args.error_rate,
        rate_limit_per_second=args.rate_limit,
        retry_after_seconds=args.retry_after,
        latency_seconds=args.latency,
        drop_rate=args.drop_rate,
        truncated_rate=args.truncated_rate,
        cursor_ttl_seconds=args.cursor_ttl,
    )
    try:
        config = SimulatorConfig(
            clients=args.clients,
            seed=args.seed,
            start=args.start,
            end=args.end,
            dirty_share=args.dirty_share,
            tokens=tokens,
            site_name=args.site_name,
            timezone=args.timezone,
            faults=faults,
        )
    except ValueError as err:
        raise ValueError(f"invalid simulator options: {err}") from err
    return config, args.host, args.port

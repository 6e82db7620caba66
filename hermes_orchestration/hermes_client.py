"""The HTTP client of a Hermes site's clients API (``/api/v1``), as the contract describes it.

One ``HermesClient`` per site: it checks the App Token (``verify``) and streams the clients
changed in a time window page by page (``iter_pages``). Transient failures (5xx, timeouts,
dropped connections, truncated bodies, 429) are retried with bounded, jittered backoff; every
other failure becomes a typed ``HermesError`` whose ``hint`` says what a person should do next.

TLS certificates are always verified. The App Token travels only in the ``Authorization``
header and never appears in a message, a hint, a log line or a repr.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, NoReturn

import httpx
import orjson

API_PREFIX = "/api/v1"
REQUIRED_SCOPE = "clients:read"
MAX_PAGE_SIZE = 1000

_log = logging.getLogger(__name__)


# --- Errors ---------------------------------------------------------------------------------


class HermesError(Exception):
    """A failure talking to a Hermes site, with the next step a person should take.

    Attributes:
        message: What went wrong.
        hint: What the person should do next.
        status: The HTTP status of the failed answer, if there was one.
        request_id: The ``X-Request-Id`` of the failed answer, if there was one.
        code: The API error code (``invalid_token``, ``insufficient_scope``, ...), if sent.
    """

    # Positional arguments only, so that ``self.args`` rebuilds the error (pickling).
    def __init__(
        self,
        message: str,
        hint: str,
        status: int | None = None,
        request_id: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message, hint, status, request_id, code)
        self.message = message
        self.hint = hint
        self.status = status
        self.request_id = request_id
        self.code = code

    def __str__(self) -> str:
        # The message alone: callers show ``hint`` beside it as the next step.
        return self.message


class AuthError(HermesError):
    """The site rejected the App Token (401)."""


class ScopeError(HermesError):
    """The App Token lacks the ``clients:read`` scope (403, or ``/verify`` without it)."""


class UnreachableError(HermesError):
    """The site's host does not resolve or refuses connections."""


class TLSError(HermesError):
    """The TLS handshake failed or the site's certificate could not be verified."""


class ProtocolError(HermesError):
    """The site answered something the contract does not allow."""


class CursorExpiredError(ProtocolError):
    """The site refused a page cursor (400): the window must be read again from its first page."""


class TransientExhaustedError(HermesError):
    """Retries were used up on transient failures; ``last_cause`` names the last one."""

    def __init__(
        self,
        message: str,
        hint: str,
        status: int | None = None,
        request_id: str | None = None,
        code: str | None = None,
        last_cause: str = "",
        attempts: int = 0,
    ) -> None:
        super().__init__(message, hint, status, request_id, code)
        self.args = (message, hint, status, request_id, code, last_cause, attempts)
        self.last_cause = last_cause
        self.attempts = attempts


class MissingTokenError(HermesError):
    """The environment variable that should hold the App Token is unset or empty."""


# --- Values ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Verification:
    """What ``/verify`` says about the App Token and its site."""

    site_name: str
    site_url: str
    timezone: str | None
    scopes: tuple[str, ...]
    expires_at: datetime | None
    request_id: str | None


@dataclass(frozen=True)
class ClientPage:
    """One page of ``/clients``: the records as decoded, and the cursor of the next page."""

    records: list[Any]  # client objects as sent; a non-object is passed through untouched
    next_cursor: str | None
    request_id: str | None
    number: int  # 1-based page number within the window


# A site that takes this long or longer to answer a page is asked for the next one ahead (_pages).
SEND_AHEAD_AFTER_SECONDS = 0.01


@dataclass(frozen=True)
class RetryPolicy:
    """Bounds on retrying one request.

    Attributes:
        max_attempts: Attempts per request, the first included.
        base_delay: Backoff before the second attempt (doubles on each retry, full jitter).
        max_delay: Cap on one backoff wait (a longer ``Retry-After`` is still honoured).
        max_total_seconds: Time one request may take, attempts and waits together; no wait
            that would end past it begins.
        timeout: Seconds for connecting, and for each read or write, of one attempt.
    """

    max_attempts: int = 6
    base_delay: float = 0.5
    max_delay: float = 30.0
    max_total_seconds: float = 300.0
    timeout: float = 30.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, got {self.max_attempts}")
        for name in ("base_delay", "max_delay", "max_total_seconds", "timeout"):
            if getattr(self, name) < 0 or (name == "timeout" and self.timeout == 0):
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")


# --- Helpers --------------------------------------------------------------------------------


class _Secret:
    """Holds the App Token so that no repr or str can show it."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "<secret>"

    __str__ = __repr__


class _RateLimiter:
    """Spaces request starts at least ``1 / rate`` seconds apart, across threads."""

    def __init__(self, rate: float | None, sleep: Callable[[float], None]) -> None:
        if rate is not None and rate <= 0:
            raise ValueError(f"max_requests_per_second must be positive or None, got {rate}")
        self._interval = 0.0 if rate is None else 1.0 / rate
        self._sleep = sleep
        self._lock = threading.Lock()
        self._next_start = 0.0

    def acquire(self) -> None:
        if not self._interval:
            return
        # Each caller reserves its own start slot under the lock, then waits outside it.
        with self._lock:
            now = time.monotonic()
            start = max(now, self._next_start)
            self._next_start = start + self._interval
        if start > now:
            self._sleep(start - now)


def normalize_site_url(site_url: str) -> str:
    """The site's base URL without a trailing slash.

    Raises:
        ValueError: Not an http(s) URL with a host, or it carries credentials, a query or a
            fragment.
    """
    example = "such as https://tienda.example.cl"
    try:
        parsed = httpx.URL(site_url.strip()) if isinstance(site_url, str) else None
    except httpx.InvalidURL:
        parsed = None
    if parsed is not None and parsed.userinfo:
        # Not echoed: the user information may hold a password.
        raise ValueError(f"site_url must not carry a user name or password; give it {example}")
    if parsed is None or parsed.scheme not in ("http", "https") or not parsed.host:
        raise ValueError(f"site_url must be an http(s) URL {example}, got {site_url!r}")
    if parsed.query or parsed.fragment:
        raise ValueError(f"site_url must have no query or fragment, got {site_url!r}")
    return str(parsed).rstrip("/")


def format_time(value: datetime) -> str:
    """RFC 3339 text of an aware datetime, in UTC with a ``Z`` offset."""
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"datetime {value.isoformat()} has no timezone; pass an aware datetime")
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _parse_time(value: str) -> datetime:
    parsed = datetime.fromisoformat(value)  # Python 3.11 reads RFC 3339, "Z" included
    if parsed.tzinfo is None:
        raise ValueError(f"timestamp {value!r} has no offset")
    return parsed


_JSON_TYPES = {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}
_JSON_ARTICLE = {dict: "an object", list: "an array", str: "a string"}


def _json_type(value: Any) -> str:
    return _JSON_TYPES.get(type(value), "number")


def _member(parent: dict[str, Any], prefix: str, key: str, kind: type) -> Any:
    """``parent[key]`` if it is a ``kind``; otherwise a ValueError naming ``prefix + key``."""
    if not isinstance(parent, dict) or key not in parent:
        raise ValueError(f"{prefix}{key} is missing")
    value = parent[key]
    if not isinstance(value, kind):
        raise ValueError(f"{prefix}{key} is a JSON {_json_type(value)}, not {_JSON_ARTICLE[kind]}")
    return value


def _root_causes(error: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _rid(request_id: str | None) -> str:
    return f" (request id {request_id})" if request_id else ""


@dataclass
class _Answer:
    """A decoded 200 answer."""

    body: Any
    request_id: str | None


class _Retry(Exception):
    """A transient failure of one attempt; the request may be tried again."""

    def __init__(
        self,
        cause: str,
        request_id: str | None = None,
        status: int | None = None,
        retry_after: float | None = None,
        malformed: bool = False,
    ) -> None:
        super().__init__(cause)
        self.cause = cause
        self.request_id = request_id
        self.status = status
        self.retry_after = retry_after
        self.malformed = malformed


# --- Client ---------------------------------------------------------------------------------


_INT64 = range(-(2**63), 2**63)


def _number_or_text(literal: str) -> float | str:
    number = float(literal)
    return number if math.isfinite(number) else literal


def _int_or_text(literal: str) -> int | str:
    number = int(literal)
    return number if number in _INT64 else literal


def _decode_json(content: bytes) -> Any:
    """Decode a JSON body; numbers a double or int64 cannot hold are kept as their literal text.

    orjson refuses a page that holds one number like 1e400 and rounds long integers; the standard
    library reads such a page, and keeping those numbers as text loses nothing of what was sent.
    """
    try:
        return orjson.loads(content)
    except orjson.JSONDecodeError:
        return json.loads(content, parse_float=_number_or_text, parse_int=_int_or_text)


class _Sent:
    """A request sent ahead on ``executor``: its response (or the error sending it) and, once it
    is answered, how long it took (the time the caller spent meanwhile is not the request's)."""

    def __init__(
        self,
        executor: ThreadPoolExecutor,
        send: Callable[[str, dict[str, str]], httpx.Response],
        path: str,
        params: dict[str, str],
    ) -> None:
        self.seconds = 0.0
        self.response: Future[httpx.Response] = executor.submit(self._timed, send, path, params)

    def _timed(
        self,
        send: Callable[[str, dict[str, str]], httpx.Response],
        path: str,
        params: dict[str, str],
    ) -> httpx.Response:
        started = time.monotonic()
        try:
            return send(path, params)
        finally:
            self.seconds = time.monotonic() - started


class HermesClient:
    """Reads one Hermes site's clients API with an App Token.

    Args:
        site_url: The site's base URL (``https://tienda.example.cl``); the API is under
            ``/api/v1``.
        token: The App Token.
        page_size: Clients per page (1 to 1000).
        max_requests_per_second: Client-side cap on request starts, retries included;
            ``None`` for no cap.
        retry: Bounds on retrying transient failures.
        token_env: The environment variable the token came from, named in hints.
        logger: Where retries are logged: a ``logging.Logger`` or Dagster's ``context.log``.
        sleep: How to wait (injectable so that tests of backoff need not wait).
    """

    def __init__(
        self,
        site_url: str,
        token: str,
        *,
        page_size: int = 500,
        max_requests_per_second: float | None = 5.0,
        retry: RetryPolicy = RetryPolicy(),  # frozen, so one shared default is safe
        token_env: str | None = None,
        logger: logging.Logger | Any | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if not 1 <= page_size <= MAX_PAGE_SIZE:
            raise ValueError(f"page_size must be between 1 and {MAX_PAGE_SIZE}, got {page_size}")
        self.site_url = normalize_site_url(site_url)
        self.base_url = self.site_url + API_PREFIX
        self.page_size = page_size
        self.retry = retry
        self.token_env = token_env
        self._log = logger if logger is not None else _log
        self._sleep = sleep
        self._limiter = _RateLimiter(max_requests_per_second, sleep)
        self._answer_seconds = 0.0  # how long the site took to answer the last request
        self._random = random.Random()
        self._token = _Secret(self._checked_token(token))
        self._http = httpx.Client(
            base_url=self.base_url,
            headers={
                "Authorization": f"Bearer {self._token.reveal()}",
                "Accept": "application/json",
                "User-Agent": "hermes-orchestration",
            },
            timeout=httpx.Timeout(retry.timeout),
            follow_redirects=False,
            verify=True,  # always: there is deliberately no way to turn it off
        )

    @classmethod
    def from_env(cls, site_url: str, token_env: str, **kwargs: Any) -> HermesClient:
        """A client whose App Token is read from ``os.environ[token_env]`` now.

        Raises:
            MissingTokenError: The variable is unset or empty; no request is made.
        """
        token = os.environ.get(token_env, "").strip()
        if not token:
            raise MissingTokenError(
                f"The environment variable {token_env} that should hold the Hermes App Token "
                f"is {'empty' if token_env in os.environ else 'not set'}.",
                f"Set {token_env} to an App Token issued in Hermes with the "
                f"{REQUIRED_SCOPE} scope, in the environment of the Dagster code location.",
            )
        return cls(site_url, token, token_env=token_env, **kwargs)

    def _checked_token(self, token: str) -> str:
        token = token.strip() if isinstance(token, str) else ""
        where = f"the environment variable {self.token_env}" if self.token_env else "the token"
        if not token:
            raise MissingTokenError(
                f"No Hermes App Token was given ({where} is empty).", self._auth_hint()
            )
        # A header can only carry visible ASCII; say so without echoing any of the token.
        if not token.isascii() or not token.isprintable() or any(c.isspace() for c in token):
            raise AuthError(
                f"The Hermes App Token in {where} contains spaces, line breaks or non-ASCII "
                "characters, which an App Token never has.",
                self._auth_hint(),
            )
        return token

    def __repr__(self) -> str:
        return f"HermesClient(site_url={self.site_url!r}, page_size={self.page_size})"

    __str__ = __repr__

    def close(self) -> None:
        """Close the pooled connections."""
        self._http.close()

    def __enter__(self) -> HermesClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # --- Endpoints ------------------------------------------------------------------------

    def verify(self) -> Verification:
        """Check the App Token and read which site it belongs to.

        Raises:
            ScopeError: The token lacks ``clients:read``.
            HermesError: Any other failure (see the subclasses).
        """
        answer = self._get("/verify", {}, what="GET /verify")
        try:
            body = answer.body
            site, token = _member(body, "", "site", dict), _member(body, "", "token", dict)
            name = _member(site, "site.", "name", str)
            url = _member(site, "site.", "url", str)
            scopes = _member(token, "token.", "scopes", list)
            if not all(isinstance(scope, str) for scope in scopes):
                raise ValueError("token.scopes holds something other than strings")
            zone = site.get("timezone")
            if zone is not None and not isinstance(zone, str):
                raise ValueError(f"site.timezone is a JSON {_json_type(zone)}, not a string")
            expires = token.get("expires_at")
            if expires is not None and not isinstance(expires, str):
                raise ValueError(f"token.expires_at is a JSON {_json_type(expires)}, not a string")
            expires_at = None if expires is None else _parse_time(expires)
        except ValueError as err:
            raise self._protocol_error(
                f"GET /verify answered a body that does not match the contract: "
                f"{err}{_rid(answer.request_id)}.",
                answer.request_id,
                status=200,
            ) from err
        verification = Verification(
            site_name=name,
            site_url=url,
            timezone=zone or None,
            scopes=tuple(scopes),
            expires_at=expires_at,
            request_id=answer.request_id,
        )
        if REQUIRED_SCOPE not in verification.scopes:
            raise ScopeError(
                f"The App Token is valid for {name!r} but lacks the {REQUIRED_SCOPE} scope "
                f"(its scopes: {', '.join(scopes) or 'none'}){_rid(answer.request_id)}.",
                self._scope_hint(),
                status=200,
                request_id=answer.request_id,
            )
        return verification

    def iter_pages(self, updated_since: datetime, updated_until: datetime) -> Iterator[ClientPage]:
        """Stream the clients with ``updated_since <= updated_at < updated_until``, page by page.

        Only one page is held at a time. The records keep the site's order.

        Raises:
            ValueError: A naive datetime, or an empty or reversed window (at once, on the call).
            CursorExpiredError: The site refused a cursor; read the window again from the start.
            HermesError: Any other failure (see the subclasses).
        """
        params = {
            "updated_since": format_time(updated_since),
            "updated_until": format_time(updated_until),
            "limit": str(self.page_size),
        }
        if updated_since >= updated_until:
            raise ValueError(
                f"the window [{params['updated_since']}, {params['updated_until']}) is empty "
                "or reversed"
            )
        return self._pages(params)

    def _pages(self, params: dict[str, str]) -> Iterator[ClientPage]:
        """The pages of a listing.

        When the site took ``SEND_AHEAD_AFTER_SECONDS`` or more to answer a page (a site across
        a network), the next page is requested as soon as the page's cursor is read, on a
        thread, so that the site prepares and sends it while the caller works through the page;
        its answer is then judged (and retried if need be) like any other. A site that answers
        sooner is asked page after page: handing a request to a thread and its answer back costs
        more than the few milliseconds it could overlap.
        """
        cursor: str | None = None
        query = params
        number = 0
        sent: _Sent | None = None
        ahead = ThreadPoolExecutor(1, thread_name_prefix="hermes-next-page")
        try:
            while True:
                number += 1
                answer = self._get("/clients", query, what=f"GET /clients page {number}", sent=sent)
                page = self._page(answer, number)
                if page.next_cursor is not None and page.next_cursor == cursor:
                    # Following it would read the same page forever.
                    raise self._protocol_error(
                        f"GET /clients page {number} answered the cursor it was sent as its "
                        f"next_cursor{_rid(answer.request_id)}.",
                        answer.request_id,
                        status=200,
                    )
                if page.next_cursor is None:
                    yield page
                    return
                cursor = page.next_cursor
                query = {**params, "cursor": cursor}
                sent = None
                if self._answer_seconds >= SEND_AHEAD_AFTER_SECONDS:
                    sent = _Sent(ahead, self._send, "/clients", query)
                yield page
        finally:
            # A caller that stops early (or fails) does not wait for a request sent ahead: it
            # ends on its own, and its answer is dropped.
            ahead.shutdown(wait=False, cancel_futures=True)

    def _page(self, answer: _Answer, number: int) -> ClientPage:
        body = answer.body
        problem = None
        if not isinstance(body, dict):
            problem = f"the body is a JSON {_json_type(body)}, not an object"
        elif "data" not in body or "next_cursor" not in body:
            missing = [key for key in ("data", "next_cursor") if key not in body]
            problem = f"the body lacks {' and '.join(missing)}"
        elif not isinstance(body["data"], list):
            problem = f"data is a JSON {_json_type(body['data'])}, not an array"
        elif body["next_cursor"] is not None and not isinstance(body["next_cursor"], str):
            problem = "next_cursor is neither a string nor null"
        elif body["next_cursor"] == "":
            problem = "next_cursor is an empty string"
        if problem:
            raise self._protocol_error(
                f"GET /clients page {number} answered a body that does not match the contract: "
                f"{problem}{_rid(answer.request_id)}.",
                answer.request_id,
                status=200,
            )
        return ClientPage(
            records=body["data"],
            next_cursor=body["next_cursor"],
            request_id=answer.request_id,
            number=number,
        )

    # --- One request, with retries ----------------------------------------------------------

    def _get(
        self, path: str, params: dict[str, str], *, what: str, sent: _Sent | None = None
    ) -> _Answer:
        """The answer to a request, retried as the policy allows; ``sent``: its first attempt,
        sent already."""
        policy = self.retry
        spent = 0.0  # time in attempts plus time waited, so an injected sleep counts too
        attempt = 0
        while True:
            attempt += 1
            started = time.monotonic()
            try:
                return self._attempt(path, params, what=what, sent=sent)
            except _Retry as failure:
                spent += time.monotonic() - started if sent is None else sent.seconds
                sent = None
                delay = self._delay(attempt, failure.retry_after)
                if attempt >= policy.max_attempts or spent + delay > policy.max_total_seconds:
                    self._give_up(what, failure, attempt, spent, delay)
                self._log.warning(
                    f"Hermes {what} failed: {failure.cause}{_rid(failure.request_id)}; "
                    f"attempt {attempt} of {policy.max_attempts}, retrying in {delay:.2f} s."
                )
                self._sleep(delay)
                spent += delay

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        policy = self.retry
        ceiling = min(policy.max_delay, policy.base_delay * 2 ** (attempt - 1))
        backoff = self._random.uniform(0, ceiling)  # full jitter
        # The site's Retry-After is a floor, even above max_delay.
        return backoff if retry_after is None else max(retry_after, backoff)

    def _give_up(
        self, what: str, failure: _Retry, attempts: int, spent: float, delay: float
    ) -> NoReturn:
        policy = self.retry
        if attempts >= policy.max_attempts:
            why = f"after {attempts} attempts"
        else:
            why = (
                f"after {attempts} attempts in {spent:.1f} s: the next wait of {delay:.1f} s "
                f"would pass the {policy.max_total_seconds:g} s budget"
            )
        rid = _rid(failure.request_id)
        if failure.malformed:
            # A body that stays broken across retries is the site's defect, not bad luck.
            raise self._protocol_error(
                f"Hermes {what} kept answering malformed JSON {why}; last: {failure.cause}{rid}.",
                failure.request_id,
                status=failure.status,
            )
        report = (
            f" If it persists, report it to Hermes with request id {failure.request_id}."
            if failure.request_id
            else ""
        )
        raise TransientExhaustedError(
            self._redact(f"Hermes {what} failed {why}; last cause: {failure.cause}{rid}."),
            self._redact(
                f"The site {self.site_url} is failing or slow ({failure.cause}); try again "
                f"later.{report}"
            ),
            failure.status,
            failure.request_id,
            None,
            failure.cause,
            attempts,
        )

    def _send(self, path: str, params: dict[str, str]) -> httpx.Response:
        self._limiter.acquire()
        started = time.monotonic()
        response = self._http.get(path, params=params)
        self._answer_seconds = time.monotonic() - started
        return response

    def _attempt(
        self, path: str, params: dict[str, str], *, what: str, sent: _Sent | None = None
    ) -> _Answer:
        try:
            response = self._send(path, params) if sent is None else sent.response.result()
        except httpx.TimeoutException as err:
            raise _Retry(
                f"timed out ({type(err).__name__}, limit {self.retry.timeout:g} s)"
            ) from err
        except httpx.ConnectError as err:
            self._raise_connect_error(what, err)
        except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError) as err:
            raise _Retry(f"connection dropped ({type(err).__name__}: {err})") from err
        except httpx.TransportError as err:
            raise UnreachableError(
                self._redact(f"Hermes {what} could not be sent: {type(err).__name__}: {err}."),
                self._unreachable_hint(),
            ) from err
        request_id = response.headers.get("x-request-id")
        status = response.status_code
        if status == 200:
            try:
                return _Answer(_decode_json(response.content), request_id)
            except ValueError as err:
                raise _Retry(
                    f"malformed or truncated JSON in a 200 answer ({err})",
                    request_id,
                    status,
                    malformed=True,
                ) from err
        code, detail = self._error_body(response)
        if status == 429:
            raise _Retry(
                f"rate limited (HTTP 429{f', {detail}' if detail else ''})",
                request_id,
                status,
                retry_after=_retry_after(response.headers.get("retry-after")),
            )
        if 500 <= status <= 599:
            # The contract calls every 5XX a transient failure; the body may not be JSON.
            raise _Retry(f"HTTP {status}{f' ({detail})' if detail else ''}", request_id, status)
        self._raise_for_status(what, response, params, code, detail)

    def _raise_connect_error(self, what: str, err: httpx.ConnectError) -> NoReturn:
        causes = list(_root_causes(err))
        if any(isinstance(cause, ssl.SSLError | ssl.CertificateError) for cause in causes):
            raise TLSError(
                self._redact(
                    f"Hermes {what}: the TLS handshake with {self.site_url} failed: {err}."
                ),
                self._redact(
                    f"The site's certificate could not be verified or it does not speak TLS: "
                    f"check that site_url ({self.site_url}) is the site's https address and that "
                    "its certificate is valid and issued by a trusted authority. TLS "
                    "verification is always on and cannot be turned off."
                ),
            ) from err
        if any(isinstance(cause, socket.gaierror) for cause in causes):
            reason = f"the host {httpx.URL(self.site_url).host!r} does not resolve"
        elif any(isinstance(cause, ConnectionRefusedError) for cause in causes):
            reason = "the connection was refused"
        else:
            reason = f"could not connect ({err})"
        raise UnreachableError(
            self._redact(f"Hermes {what}: {reason} ({self.site_url})."),
            self._unreachable_hint(),
        ) from err

    def _raise_for_status(
        self,
        what: str,
        response: httpx.Response,
        params: dict[str, str],
        code: str | None,
        detail: str,
    ) -> NoReturn:
        status = response.status_code
        request_id = response.headers.get("x-request-id")
        said = f": {detail}" if detail else ""
        head = f"Hermes {what} answered HTTP {status}{said}{_rid(request_id)}."
        if status == 401:
            raise AuthError(
                self._redact(f"The site rejected the App Token. {head}"),
                self._auth_hint(),
                status,
                request_id,
                code,
            )
        if status == 403:
            raise ScopeError(
                self._redact(f"The App Token lacks the {REQUIRED_SCOPE} scope. {head}"),
                self._scope_hint(),
                status,
                request_id,
                code,
            )
        if status == 400 and "cursor" in params:
            raise CursorExpiredError(
                self._redact(f"The site refused the page cursor (unknown or expired). {head}"),
                self._redact(
                    "Read the window again from its first page. If it keeps happening, the "
                    "window takes longer to read than the site keeps its cursors: use smaller "
                    "windows, or report it to Hermes"
                    + (f" with request id {request_id}." if request_id else ".")
                ),
                status,
                request_id,
                code,
            )
        if 300 <= status <= 399 and response.headers.get("location"):
            location = response.headers["location"]
            raise self._protocol_error(
                f"{head[:-1]}, a redirect to {location}.",
                request_id,
                status=status,
                code=code,
                hint=f"Set site_url to the address the site redirects to ({location}) without "
                f"{API_PREFIX}, if that is the site's own address.",
            )
        hint = None
        if status == 404:
            hint = (
                f"Check that site_url ({self.site_url}) is the Hermes site's base URL (the API "
                f"is expected under {API_PREFIX}); if it is, report this to Hermes"
                + (f" with request id {request_id}." if request_id else ".")
            )
        raise self._protocol_error(head, request_id, status=status, code=code, hint=hint)

    @staticmethod
    def _error_body(response: httpx.Response) -> tuple[str | None, str]:
        """The API error code and a short description, if the body is the contract's Error."""
        try:
            error = orjson.loads(response.content)["error"]
            code, message = error.get("code"), error.get("message")
        except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError):
            return None, ""
        code = code if isinstance(code, str) else None
        parts = [part for part in (code, message if isinstance(message, str) else None) if part]
        return code, " - ".join(parts)[:300]

    # --- Messages ---------------------------------------------------------------------------

    def _redact(self, text: str) -> str:
        # Belt and braces: a site could echo the token back in an error message.
        token = self._token.reveal() if hasattr(self, "_token") else ""
        return text.replace(token, "<redacted>") if token else text

    def _protocol_error(
        self,
        message: str,
        request_id: str | None,
        *,
        status: int | None = None,
        code: str | None = None,
        hint: str | None = None,
    ) -> ProtocolError:
        if hint is None:
            hint = "Report this to Hermes" + (
                f" with request id {request_id}." if request_id else " (no request id was sent)."
            )
        return ProtocolError(self._redact(message), self._redact(hint), status, request_id, code)

    def _auth_hint(self) -> str:
        where = (
            f"the environment variable {self.token_env}"
            if self.token_env
            else "the environment variable this integration reads its token from"
        )
        return (
            f"Issue a new App Token in Hermes (with the {REQUIRED_SCOPE} scope) and set it in "
            f"{where}."
        )

    def _scope_hint(self) -> str:
        return (
            f"Give the App Token the {REQUIRED_SCOPE} scope in Hermes, or issue a new App Token "
            "with it" + (f" and set it in {self.token_env}." if self.token_env else ".")
        )

    def _unreachable_hint(self) -> str:
        return (
            f"Check site_url ({self.site_url}): the host must exist, be reachable from here and "
            "accept connections on its port."
        )


def _retry_after(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header in whole seconds; None if absent or not a number."""
    if value is None:
        return None
    try:
        seconds = int(value.strip())
    except ValueError:
        return None
    return float(seconds) if seconds >= 0 else None

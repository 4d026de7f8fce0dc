"""The APSIS One client: token, export requests and streamed downloads, with errors mapped.

One ``requests.Session`` per process; the session is the seam for tests (mount a transport).
The bearer token is only ever sent to the configured APSIS origin.
"""

from __future__ import annotations

import email.utils
import hashlib
import ipaddress
import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import BinaryIO
from urllib.parse import quote, urlsplit

import redis
import requests

from worker.apsis.bearer import BearerToken, TokenCache, jwt_times
from worker.apsis.ratelimit import Limit, RateLimiter
from worker.errors import (
    ApsisAuthError,
    ApsisError,
    DownloadError,
    DownloadRefused,
    DownloadTooLarge,
    PermanentApsisError,
    RateLimited,
    RetryableApsisError,
)
from worker.telemetry import metrics

log = logging.getLogger(__name__)

#: Seconds to open a TCP/TLS connection to APSIS.
CONNECT_TIMEOUT = 5.0
#: Seconds to wait for each read from APSIS (between two chunks of a download, too).
READ_TIMEOUT = 30.0
#: Bytes read per chunk of a download.
DOWNLOAD_CHUNK = 256 * 1024
#: Path templates, kept in one place (the export path is inferred from the docs).
TOKEN_PATH = "/oauth/token"
EXPORT_PATH = "/audience/profiles/export-single/{export_key}"
#: Largest Retry-After honoured, in seconds (a bogus header must not park a job for days).
MAX_RETRY_AFTER = 3600.0
#: Statuses worth retrying (the docs' 408, 429 and the 5xx family).
RETRYABLE = frozenset({408, 429, 500, 502, 503, 504})
#: Longest a caller lets the limiter park it inside a task, in seconds.
DEFAULT_MAX_WAIT = 1.5


@dataclass(frozen=True)
class Downloaded:
    sha256: str
    bytes: int


@dataclass(frozen=True)
class Limits:
    """The account's documented limits (scaled-down in tests)."""

    export: Limit = Limit(1, 1.0)
    download: Limit = Limit(60, 60.0)
    token: Limit = Limit(10, 60.0)
    other: Limit = Limit(100, 1.0)


def retry_after_seconds(value: str | None, *, now: float | None = None) -> float | None:
    """``Retry-After`` as seconds (it may be a delay or an HTTP date), capped; None if absent."""
    if not value:
        return None
    value = value.strip()
    # HTTP's delay-seconds is ASCII digits only: str.isdigit() also accepts "²" (a latin-1
    # byte a header can carry), which float() then rejects with a ValueError.
    if value.isascii() and value.isdigit():
        return min(float(value), MAX_RETRY_AFTER)
    try:
        when = email.utils.parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError):
        return None
    return min(max(when - (time.time() if now is None else now), 0.0), MAX_RETRY_AFTER)


def _problem(response: requests.Response) -> str:
    """A short, key-free description of an APSIS error answer."""
    title = ""
    try:
        body = response.json()
        if isinstance(body, dict):
            title = str(body.get("title") or body.get("message") or "")[:120]
    except ValueError:
        pass
    return f"HTTP {response.status_code}" + (f" {title}" if title else "")


def error_for(response: requests.Response, what: str) -> ApsisError:
    """Map an APSIS error answer to a retryable or permanent error."""
    status = response.status_code
    message = f"APSIS {what}: {_problem(response)}"
    if status in RETRYABLE or status >= 500:
        return RetryableApsisError(
            message,
            status=status,
            retry_after=retry_after_seconds(response.headers.get("Retry-After")),
        )
    return PermanentApsisError(message, status=status)


def _is_loopback_http(base: str) -> bool:
    parts = urlsplit(base)
    if parts.scheme != "http" or parts.hostname is None:
        return False
    if parts.hostname == "localhost":
        return True
    try:
        return ipaddress.ip_address(parts.hostname).is_loopback
    except ValueError:
        return False


def _origin(url: str) -> tuple[str, str, int]:
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return parts.scheme, (parts.hostname or "").lower(), port


#: Longest host text quoted in a refusal reason (the URL comes from an unauthenticated caller).
MAX_QUOTED_HOST = 100


def _where(url: str) -> str:
    """The scheme, host and port of ``url`` for a refusal reason: never its path or query."""
    try:
        scheme, host, port = _origin(url)
    except ValueError:
        return "(an unparsable URL)"
    if not host:
        return "(a URL without a host)"
    return f"{scheme}://{host[:MAX_QUOTED_HOST]}:{port}"


def _redirect_refused(response: requests.Response) -> str:
    """The reason for refusing a redirect on a call that carries a credential: the status and
    where it pointed (scheme, host and port only), never followed."""
    target = _where(response.headers.get("Location") or "")
    return f"answered a redirect (HTTP {response.status_code}) to {target}; not followed"


def _is_public(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    # is_private misses the shared space 100.64.0.0/10, where Alibaba Cloud's metadata
    # service lives (100.100.100.200); is_global excludes it.
    return not (
        not ip.is_global
        or ip.is_private
        or ip.is_loopback
        or ip.is_link_local
        or ip.is_multicast
        or ip.is_reserved
        or ip.is_unspecified
    )


class DownloadPolicy:
    """Decides whether a download URL from a callback may receive the bearer token.

    Only the configured APSIS origin (scheme, host and port) over https; plain http only when
    the configured base URL is itself loopback http (the sandbox). When the configured host is
    a public name, it must also resolve to public addresses only (no DNS rebinding to an
    internal service or the cloud metadata address).
    """

    def __init__(
        self,
        base_url: str,
        *,
        resolve: Callable[[str], list[str]] | None = None,
    ) -> None:
        self._origin = _origin(base_url)
        self._sandbox = _is_loopback_http(base_url)
        self._resolve = resolve or _resolve_host

    def check(self, url: str) -> None:
        """Raise DownloadRefused (with a reason that names no secret) if ``url`` is not allowed.

        A URL that cannot be parsed (``https://[api.apsis.one/...``) is refused like any other.
        """
        try:
            parts = urlsplit(url)  # ValueError: "Invalid IPv6 URL", a bracketed non-address
        except ValueError:
            raise DownloadRefused("download URL cannot be parsed") from None
        if parts.scheme not in ("https", "http") or not parts.hostname:
            raise DownloadRefused("download URL is not an http(s) URL with a host")
        if parts.username or parts.password:
            raise DownloadRefused("download URL carries credentials")
        if parts.scheme != "https" and not self._sandbox:
            raise DownloadRefused(f"download URL {_where(url)} is not https")
        try:
            origin = _origin(url)
        except ValueError:
            raise DownloadRefused("download URL has an invalid port") from None
        if origin != self._origin:
            raise DownloadRefused(
                f"download URL {_where(url)} is not on the configured APSIS origin"
            )
        if not self._sandbox:
            addresses = self._resolve(origin[1])
            if not addresses or not all(_is_public(a) for a in addresses):
                raise DownloadRefused("APSIS host resolves to a non-public address")


def _resolve_host(host: str) -> list[str]:
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except OSError:
        return []
    return sorted({str(info[4][0]) for info in infos})


def max_lateness(limit: Limit) -> float:
    """Seconds a paced request may leave after its slot: half the room the safety margin
    leaves in one window (``count`` slots span ``period / (1 - margin)``), the other half
    being for jitter on the way. Later, it takes a new slot instead of crowding the next."""
    return (limit.interval * limit.count - limit.period) / 2


def apsis_session(base_url: str) -> requests.Session:
    """A session for ``base_url`` with the environment's proxy and CA settings read once.

    requests otherwise reads them again on every call (``trust_env``: HTTPS_PROXY,
    NO_PROXY, ALL_PROXY, REQUESTS_CA_BUNDLE, CURL_CA_BUNDLE and ~/.netrc, about 0.15 ms a
    call). Every URL the client calls is on ``base_url``'s origin (DownloadPolicy refuses
    others), so the proxy chosen for it now, NO_PROXY included, is the one for every call.
    Not reading ~/.netrc also means its Basic credentials can never replace our bearer.
    """
    session = requests.Session()
    session.trust_env = False
    session.proxies.update(requests.utils.get_environ_proxies(base_url))
    bundle = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE")
    if bundle:
        session.verify = bundle
    return session


class ApsisClient:
    """Talks to one APSIS One account."""

    def __init__(
        self,
        *,
        base_url: str,
        client_id: str,
        client_secret: str,
        account: str,
        redis_client: redis.Redis,
        session: requests.Session | None = None,
        limits: Limits | None = None,
        limiter: RateLimiter | None = None,
        policy: DownloadPolicy | None = None,
        max_wait: float = DEFAULT_MAX_WAIT,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.account = account
        self._client_id = client_id
        self._client_secret = client_secret
        self._session = session or apsis_session(self.base_url)
        self._limits = limits or Limits()
        self._limiter = limiter or RateLimiter(redis_client)
        self._policy = policy or DownloadPolicy(self.base_url)
        self._max_wait = max_wait
        self.tokens = TokenCache(redis_client, account, self._fetch_token)

    @property
    def limits(self) -> Limits:
        return self._limits

    # -- pacing -----------------------------------------------------------------------

    def _pace(self, kind: str, limit: Limit) -> None:
        """Wait for the pool-wide slot, briefly; a longer wait is the caller's to schedule."""
        slot = self._limiter.acquire(self.account, kind, limit, max_wait=self._max_wait)
        if not slot.granted:
            raise RateLimited(f"rate limit ({kind}): no slot free yet", retry_after=slot.wait)
        if slot.wait > 0:
            time.sleep(slot.wait)

    # -- token ------------------------------------------------------------------------

    def _fetch_token(self) -> BearerToken:
        self._pace("token", self._limits.token)
        body = {
            "grant_type": "client_credentials",
            "client_id": self._client_id,
            "client_secret": self._client_secret,
        }
        fetched_at = time.time()
        try:
            response = metrics.timed_apsis_call(
                "token",
                lambda: self._session.post(
                    self.base_url + TOKEN_PATH,
                    json=body,
                    timeout=(CONNECT_TIMEOUT, READ_TIMEOUT),
                    # A 307/308 would re-post client_id and client_secret to its Location.
                    allow_redirects=False,
                ),
            )
        except requests.RequestException as exc:
            raise RetryableApsisError(f"APSIS token: {type(exc).__name__}") from None
        if 300 <= response.status_code < 400:
            raise ApsisAuthError(f"APSIS token: {_redirect_refused(response)}")
        if response.status_code in (400, 401, 403):
            raise ApsisAuthError(f"APSIS token: {_problem(response)} (check the credentials)")
        if response.status_code != 200:
            raise error_for(response, "token")
        try:
            data = response.json()
            token = str(data["access_token"])
        except (ValueError, KeyError, TypeError):
            raise RetryableApsisError("APSIS token: malformed answer") from None
        expires_in = data.get("expires_in")
        issued, expires = jwt_times(
            token,
            fetched_at=fetched_at,
            expires_in=float(expires_in) if isinstance(expires_in, (int, float)) else None,
        )
        log.info("fetched a new APSIS token", extra={"seconds": round(expires - fetched_at)})
        return BearerToken(token, issued, expires)

    # -- authenticated calls ------------------------------------------------------------

    def _authorized(
        self, send: Callable[[str], requests.Response], what: str, *, kind: str, limit: Limit
    ) -> requests.Response:
        """Send with the shared token; on 401/403 refresh it once and retry once, at a new
        ``kind`` slot: the refused request had its slot (APSIS may have counted it), and the
        refresh (itself paced) can take longer than a slot, so the retry sent at once would
        crowd the requests paced after it. RateLimited if no slot is free soon."""
        token = self.tokens.get()
        response = send(token)
        if response.status_code in (401, 403):
            response.close()
            self.tokens.invalidate(token)
            token = self.tokens.get()
            self._pace(kind, limit)
            response = send(token)
            if response.status_code in (401, 403):
                response.close()
                raise ApsisAuthError(f"APSIS {what}: {_problem(response)} after a token refresh")
        return response

    def request_export(
        self,
        export_key: str,
        callback_url: str,
        *,
        history: bool,
        definitions: bool,
        merged: bool,
        paced: bool = True,
        send_at: float | None = None,
    ) -> None:
        """Ask APSIS for the profile's export; it answers 202 and calls back later.

        ``paced=False`` when the caller already holds an export slot from the limiter;
        ``send_at`` (time.monotonic()) is that slot's time: the request leaves then, after
        everything else is prepared, so local delays do not bunch requests together.
        """
        if paced:
            self._pace("export", self._limits.export)
        url = self.base_url + EXPORT_PATH.format(export_key=quote(export_key, safe=""))
        body = {
            "callback_url": callback_url,
            "include_attribute_history": history,
            "include_type_definitions": definitions,
            "include_merged_profiles": merged,
        }

        def send(token: str) -> requests.Response:
            return metrics.timed_apsis_call(
                "export",
                lambda: self._session.post(
                    url,
                    json=body,
                    headers={"Authorization": f"Bearer {token}"},
                    timeout=(CONNECT_TIMEOUT, READ_TIMEOUT),
                    allow_redirects=False,
                ),
            )

        if send_at is not None:
            self.tokens.get()  # a token fetch must not make this request late
            time.sleep(max(0.0, send_at - time.monotonic()))
            late = time.monotonic() - send_at
            if late > max_lateness(self._limits.export):
                # Sent now, it would arrive nearer the next requests than the limit allows.
                raise RateLimited(f"missed its export slot by {late * 1000:.0f} ms", retry_after=0)
        try:
            response = self._authorized(
                send, "export request", kind="export", limit=self._limits.export
            )
        except requests.RequestException as exc:
            raise RetryableApsisError(f"APSIS export request: {type(exc).__name__}") from None
        with response:
            if 300 <= response.status_code < 400:
                raise PermanentApsisError(
                    f"APSIS export request: {_redirect_refused(response)}",
                    status=response.status_code,
                )
            if response.status_code not in (200, 201, 202):
                raise error_for(response, "export request")

    def check_download_url(self, url: str) -> None:
        self._policy.check(url)

    def download(
        self,
        url: str,
        to_file: BinaryIO,
        *,
        max_bytes: int,
        timeout: float,
        send_at: float | None = None,
    ) -> Downloaded:
        """Stream the export file into ``to_file`` while hashing it; never held in memory.

        ``send_at`` (unix time): the download slot the caller reserved; the request leaves
        then. A slot missed by more than ``max_lateness`` (the fetch waited for a worker) is
        replaced by a new one from the limiter. None: take a slot from the limiter now.
        Raises DownloadRefused before sending anything if the URL is not APSIS's,
        DownloadTooLarge past ``max_bytes``, RetryableApsisError while the file is not ready
        or APSIS fails, PermanentApsisError (410) once the link has expired, RateLimited
        when no slot is free soon.
        """
        self._policy.check(url)
        if send_at is None:
            self._pace("download", self._limits.download)
        else:
            self.tokens.get()  # a token fetch must not make this download late
            time.sleep(max(0.0, send_at - time.time()))
            if time.time() - send_at > max_lateness(self._limits.download):
                self._pace("download", self._limits.download)

        def send(token: str) -> requests.Response:
            return metrics.timed_apsis_call(
                "download",
                lambda: self._session.get(
                    url,
                    headers={"Authorization": f"Bearer {token}", "Accept-Encoding": "gzip"},
                    timeout=(CONNECT_TIMEOUT, READ_TIMEOUT),
                    stream=True,
                    allow_redirects=False,  # a redirect would carry the token elsewhere
                ),
            )

        started = time.monotonic()
        try:
            response = self._authorized(
                send, "download", kind="download", limit=self._limits.download
            )
        except requests.RequestException as exc:
            raise RetryableApsisError(f"APSIS download: {type(exc).__name__}") from None
        with response:
            if 300 <= response.status_code < 400:
                status = response.status_code
                target = _where(response.headers.get("Location") or "")
                raise DownloadRefused(
                    f"APSIS download answered a redirect ({status}) to {target}; not followed"
                )
            if response.status_code in (202, 404):
                raise RetryableApsisError(
                    f"APSIS download: not ready (HTTP {response.status_code})",
                    status=response.status_code,
                    retry_after=retry_after_seconds(response.headers.get("Retry-After")),
                )
            if response.status_code != 200:
                raise error_for(response, "download")
            declared = response.headers.get("Content-Length")
            if declared and declared.isdigit() and int(declared) > max_bytes:
                raise DownloadTooLarge(
                    f"export file is {declared} bytes, over DOWNLOAD_MAX_BYTES ({max_bytes})"
                )
            digest = hashlib.sha256()
            size = 0
            try:
                for chunk in response.iter_content(DOWNLOAD_CHUNK):
                    size += len(chunk)
                    if size > max_bytes:
                        raise DownloadTooLarge(
                            f"export file exceeds DOWNLOAD_MAX_BYTES ({max_bytes} bytes)"
                        )
                    if time.monotonic() - started > timeout:
                        raise DownloadError(f"download exceeded {timeout:.0f} s")
                    digest.update(chunk)
                    to_file.write(chunk)
            except requests.RequestException as exc:
                reason = type(exc).__name__
                raise RetryableApsisError(f"APSIS download interrupted: {reason}") from None
        return Downloaded(sha256=digest.hexdigest(), bytes=size)

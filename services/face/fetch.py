"""Fetch the image of a job without letting its URL reach places it should not.

The first step of the face engine downloads ``image_url`` from a job. The URL comes from
whoever submitted the job, so this module treats it as hostile (server-side request forgery):

- Schemes: ``http`` and ``https``, and ``data:`` URIs (base64 or percent-encoded) given as the
  job's URL. A redirect may only lead to ``http`` or ``https``. User names and passwords in a URL
  are refused, and never appear in a message.
- Addresses: only public addresses are fetched. Private, loopback, link-local (and so the cloud
  metadata addresses 169.254.169.254 and fd00:ec2::254), multicast, reserved, unspecified and
  shared (CGNAT, 100.64.0.0/10) addresses are refused, and so are IPv6 addresses that embed such
  an IPv4 address (IPv4-mapped, NAT64 64:ff9b::/96, 6to4). ``BLUEENGINE_FETCH_ALLOW_NETS``, a
  comma-separated list of CIDR networks, or the ``allow_nets`` argument, allows more.
- Host spellings: an IPv4 address must be written as four decimal numbers. Hosts that a resolver
  would read as a number in another form (``2130706433``, ``0x7f000001``, ``0177.0.0.1``,
  ``127.1``) are refused instead of guessed at. Other names go through IDNA first, so full-width
  digits cannot sneak an address past the check.
- Pinning: a host name is resolved once with ``socket.getaddrinfo``; every address it yields
  must pass, and the TCP connection is opened to one of exactly those addresses. HTTP/1.1 is then
  spoken over that socket with the name in the Host header, and for https the name is used for
  SNI and certificate verification. There is no second lookup that a rebinding DNS server could
  answer differently. Every redirect target goes through the same checks.
- Limits (:class:`FetchLimits`): redirects, body bytes, connect, read and total time. The byte
  limit is counted on the bytes actually received, so a missing or lying Content-Length changes
  nothing; a Content-Length over the limit fails before the body is read.
- Content coding: requests say ``Accept-Encoding: identity``. A server that compresses anyway
  with gzip or deflate (zlib format, as HTTP defines it) is decoded incrementally, at most 64 KiB
  of output per step, and the decoded bytes count against the limit, so a gzip bomb stops at
  ``max_bytes``. Any other coding fails the fetch.
- Content-Type is not trusted or checked: the image decoder decides what the bytes are.

Every failure is a :class:`FetchError` whose ``code`` is one of ``url_refused``,
``fetch_failed`` or ``too_large``.
"""

from __future__ import annotations

import base64
import binascii
import http.client
import io
import ipaddress
import os
import re
import socket
import ssl
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from urllib.parse import quote, unquote_to_bytes, urljoin, urlsplit

__all__ = [
    "ALLOW_NETS_ENV",
    "FETCH_FAILED",
    "TOO_LARGE",
    "URL_REFUSED",
    "FetchError",
    "FetchLimits",
    "fetch",
    "parse_allow_nets",
]

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address

ALLOW_NETS_ENV = "BLUEENGINE_FETCH_ALLOW_NETS"

URL_REFUSED = "url_refused"
FETCH_FAILED = "fetch_failed"
TOO_LARGE = "too_large"

REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
USER_AGENT = "blueengine-fetch/0.1"

_READ_BYTES = 64 * 1024
_INFLATE_PIECE_BYTES = 64 * 1024
_SHOWN_URL_CHARS = 200

_METADATA_ADDRESSES = frozenset(
    {ipaddress.ip_address("169.254.169.254"), ipaddress.ip_address("fd00:ec2::254")}
)
_SHARED_NET = ipaddress.ip_network("100.64.0.0/10")
_IPV4_COMPATIBLE_NET = ipaddress.ip_network("::/96")
_NAT64_NET = ipaddress.ip_network("64:ff9b::/96")
_HOST_NAME = re.compile(r"^[a-z0-9_-]+(\.[a-z0-9_-]+)*$")
_NUMERIC_LABEL = re.compile(r"^([0-9]+|0x[0-9a-f]*)$")
_USERINFO = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*://)[^/?#]*@")


@dataclass(frozen=True)
class FetchLimits:
    """Bounds on one fetch; the defaults suit photos of people.

    ``max_bytes`` counts the body after content decoding; the three timeouts bound connecting
    (per address), waiting for any data, and the whole fetch including redirects. Example::

        fetch(url, FetchLimits(max_bytes=5 * 1024 * 1024, total_timeout_s=10))
    """

    max_redirects: int = 5
    max_bytes: int = 20 * 1024 * 1024
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 10.0
    total_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        if self.max_redirects < 0:
            raise ValueError(f"FetchLimits.max_redirects must be >= 0, not {self.max_redirects}")
        for name in ("max_bytes", "connect_timeout_s", "read_timeout_s", "total_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"FetchLimits.{name} must be > 0, not {getattr(self, name)}")


class FetchError(Exception):
    """Raised when a URL is refused, cannot be fetched, or its body is over the byte limit."""

    def __init__(self, code: str, url: str, reason: str) -> None:
        verb = {URL_REFUSED: "refused", TOO_LARGE: "stopped fetching"}.get(code, "could not fetch")
        super().__init__(f"{verb} {url}: {reason}")
        self.code = code
        self.url = url
        self.reason = reason


def parse_allow_nets(text: str) -> list[Network]:
    """Parse a comma-separated list of CIDR networks, such as ``10.0.0.0/8, fd00::/8``.

    A bare address means that address alone. Raises ValueError naming the bad entry.
    """
    nets: list[Network] = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        try:
            nets.append(ipaddress.ip_network(item))
        except ValueError as exc:
            raise ValueError(f"{ALLOW_NETS_ENV}: {item!r} is not a CIDR network ({exc})") from None
    return nets


def fetch(
    url: str, limits: FetchLimits = FetchLimits(), allow_nets: Sequence[Network] | None = None
) -> bytes:
    """Return the body at ``url``, following redirects, within ``limits``.

    ``allow_nets`` lists networks that may be fetched although they are not public; None reads
    them from ``BLUEENGINE_FETCH_ALLOW_NETS``. Raises :class:`FetchError`.

    Example::

        jpeg = fetch("https://example.org/face.jpg", FetchLimits(total_timeout_s=10))
        fetch("http://10.0.0.1/x")  # FetchError: refused http://10.0.0.1/x: 10.0.0.1 is a ...
        fetch("http://10.0.0.1/x", allow_nets=parse_allow_nets("10.0.0.0/8"))  # fetched
    """
    nets = (
        parse_allow_nets(os.environ.get(ALLOW_NETS_ENV, "")) if allow_nets is None else allow_nets
    )
    if url.lstrip()[:5].lower() == "data:":
        return _decode_data_uri(url.strip(), limits.max_bytes)

    deadline = time.monotonic() + limits.total_timeout_s
    visited: set[str] = set()
    current, source = url, None
    while True:
        target = _check_url(current, nets, source)
        visited.add(target.url)
        location = _get(target, limits, deadline)
        if isinstance(location, bytes):
            return location

        next_url = urljoin(target.url, location)
        if urlsplit(next_url)._replace(fragment="").geturl() in visited:
            raise FetchError(
                FETCH_FAILED, target.shown, f"redirect loop back to {_shown(next_url)}"
            )
        if len(visited) > limits.max_redirects:
            raise FetchError(
                FETCH_FAILED, _shown(url), f"too many redirects (more than {limits.max_redirects})"
            )
        current, source = next_url, _shown(url)


@dataclass(frozen=True)
class _Target:
    """An http(s) URL that passed every check, with the addresses it may connect to."""

    url: str
    shown: str
    https: bool
    host: str
    port: int
    request_target: str
    addresses: tuple[str, ...]


def _shown(url: str) -> str:
    """The URL as messages show it: no user name or password, and not endlessly long."""
    url = _USERINFO.sub(r"\1", url, count=1)
    if len(url) > _SHOWN_URL_CHARS:
        url = url[: _SHOWN_URL_CHARS - 3] + "..."
    return url


def _check_url(url: str, allow_nets: Sequence[Network], source: str | None) -> _Target:
    """Check scheme, credentials, host and addresses of ``url``; raise ``url_refused``."""
    shown = _shown(url.strip())
    if source is not None:
        shown = f"{shown} (redirected from {source})"
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError as exc:
        raise FetchError(URL_REFUSED, shown, f"malformed URL ({exc})") from None

    if parts.scheme not in ("http", "https"):
        raise FetchError(URL_REFUSED, shown, f"scheme {parts.scheme!r} is not http or https")
    if "@" in parts.netloc:
        raise FetchError(URL_REFUSED, shown, "credentials in the URL are not allowed")
    # urlsplit silently drops tabs and newlines, even inside the host; refuse them instead.
    if any(not c.isprintable() for c in url.strip()) or any(c.isspace() for c in parts.netloc):
        raise FetchError(URL_REFUSED, shown, "the URL contains whitespace or control characters")
    if port == 0:
        raise FetchError(URL_REFUSED, shown, "port 0 is not a port")

    host, literal = _parse_host(parts.netloc, parts.hostname or "", shown)
    port = port or (443 if parts.scheme == "https" else 80)
    addresses = [literal] if literal is not None else _resolve(host, port, shown)
    for address in addresses:
        reason = _address_refusal(address, allow_nets)
        if reason is not None:
            raise FetchError(URL_REFUSED, shown, reason)

    return _Target(
        url=parts._replace(fragment="").geturl(),
        shown=shown,
        https=parts.scheme == "https",
        host=host,
        port=port,
        request_target=_request_target(parts.path, parts.query),
        addresses=tuple(str(address) for address in addresses),
    )


def _parse_host(netloc: str, hostname: str, shown: str) -> tuple[str, Address | None]:
    """Return the host in ASCII, and its address when it is an IP literal."""
    if not hostname:
        raise FetchError(URL_REFUSED, shown, "the URL has no host")
    if netloc.startswith("["):
        try:
            return hostname, ipaddress.IPv6Address(hostname)
        except ValueError:
            raise FetchError(URL_REFUSED, shown, f"{hostname!r} is not an IPv6 address") from None
    try:
        host = hostname.encode("idna").decode("ascii").lower()
    except UnicodeError:
        raise FetchError(URL_REFUSED, shown, f"{hostname!r} is not a valid host name") from None
    host = host.removesuffix(".")

    try:
        return host, ipaddress.IPv4Address(host)
    except ValueError:
        pass
    if not _HOST_NAME.match(host):
        raise FetchError(URL_REFUSED, shown, f"{host!r} is not a valid host name")
    if _NUMERIC_LABEL.match(host.rpartition(".")[2]):
        # Resolvers read these as IPv4 addresses in decimal, octal, hex or short form.
        raise FetchError(URL_REFUSED, shown, f"{host!r} is not a dotted-decimal IPv4 address")
    return host, None


def _resolve(host: str, port: int, shown: str) -> list[Address]:
    """Resolve ``host`` once; the addresses returned are the only ones connected to."""
    # TODO: getaddrinfo cannot be interrupted, so a slow resolver can hold a fetch past
    # total_timeout_s; bounding it needs a resolver thread or an async resolver.
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:
        raise FetchError(FETCH_FAILED, shown, f"could not resolve {host!r} ({exc})") from None
    addresses = list(dict.fromkeys(ipaddress.ip_address(info[4][0]) for info in infos))
    if not addresses:
        raise FetchError(FETCH_FAILED, shown, f"{host!r} resolved to no address")
    return addresses


def _address_refusal(address: Address, allow_nets: Sequence[Network]) -> str | None:
    """Why ``address`` may not be fetched, or None when it may."""
    if _allowed(address, allow_nets):
        return None
    inner = _embedded_ipv4(address)
    if inner is not None:
        if _allowed(inner, allow_nets):
            return None
        reason = _non_public_reason(inner)
        if reason is not None:
            return f"{address} embeds {inner}, {reason}"
        if isinstance(address, ipaddress.IPv6Address) and address.sixtofour is None:
            return None  # IPv4-mapped and NAT64 addresses reach just the IPv4 address judged
    reason = _non_public_reason(address)
    return None if reason is None else f"{address} is {reason}"


def _allowed(address: Address, allow_nets: Sequence[Network]) -> bool:
    return any(address.version == net.version and address in net for net in allow_nets)


def _embedded_ipv4(address: Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address that an IPv4-mapped, NAT64 or 6to4 IPv6 address leads to."""
    if isinstance(address, ipaddress.IPv4Address):
        return None
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address in _NAT64_NET:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return address.sixtofour


def _non_public_reason(address: Address) -> str | None:
    """Which kind of non-public address ``address`` is, or None for a public one."""
    if address in _METADATA_ADDRESSES:
        return "a cloud metadata address"
    checks = (
        (address.is_unspecified, "an unspecified address"),
        (address.is_loopback, "a loopback address"),
        (address.is_link_local, "a link-local address"),
        (address.is_multicast, "a multicast address"),
        (address in _SHARED_NET, "a shared (CGNAT) address"),
        (address in _IPV4_COMPATIBLE_NET, "a deprecated IPv4-compatible address"),
        (address.is_private, "a private address"),
        (address.is_reserved, "a reserved address"),
        (not address.is_global, "not a public address"),
    )
    return next((reason for failed, reason in checks if failed), None)


def _request_target(path: str, query: str) -> str:
    """Path and query as sent on the request line, percent-encoded where needed."""
    safe = "/%:@!$&'()*+,;=-._~"
    target = quote(path or "/", safe=safe)
    return f"{target}?{quote(query, safe=safe + '?')}" if query else target


def _get(target: _Target, limits: FetchLimits, deadline: float) -> bytes | str:
    """GET ``target``: the body on success, the Location of a redirect, else raise."""
    connection = _PinnedConnection(target, limits, deadline)
    try:
        connection.request("GET", target.request_target, headers=_REQUEST_HEADERS)
        with connection.getresponse() as response:
            return _outcome(response, target.shown, limits.max_bytes)
    except TimeoutError:
        # Near the deadline, sockets wait only for what is left of the total time.
        if time.monotonic() >= deadline:
            reason = f"timed out after {limits.total_timeout_s:g} s in total"
        else:
            reason = f"timed out waiting {limits.read_timeout_s:g} s for data"
        raise FetchError(FETCH_FAILED, target.shown, reason) from None
    except ssl.SSLError as exc:
        raise FetchError(FETCH_FAILED, target.shown, f"TLS failed ({exc})") from None
    except http.client.IncompleteRead as exc:
        reason = f"transfer broken after {len(exc.partial)} bytes of the body"
        raise FetchError(FETCH_FAILED, target.shown, reason) from None
    except (http.client.HTTPException, OSError) as exc:
        reason = f"transfer broken ({type(exc).__name__}: {exc})"
        raise FetchError(FETCH_FAILED, target.shown, reason) from None
    finally:
        connection.close()


def _outcome(response: http.client.HTTPResponse, shown: str, max_bytes: int) -> bytes | str:
    """The body of a successful response, or the Location of a redirect; else raise."""
    if response.status in REDIRECT_STATUSES:
        location = response.getheader("Location")
        if not location:
            raise FetchError(FETCH_FAILED, shown, f"HTTP {response.status} without a Location")
        return location.strip()
    if not 200 <= response.status < 300:
        reason = f"HTTP {response.status} {response.reason}".rstrip()
        raise FetchError(FETCH_FAILED, shown, reason)
    return _read_body(response, shown, max_bytes)


_REQUEST_HEADERS = {
    "User-Agent": USER_AGENT,
    "Accept": "image/*, */*;q=0.5",
    "Accept-Encoding": "identity",
    "Connection": "close",
}


def _read_body(response: http.client.HTTPResponse, shown: str, max_bytes: int) -> bytes:
    """Read the body, decoding gzip or deflate, and stop as soon as it passes ``max_bytes``."""
    inflater = _Inflater.for_encoding(response.getheader("Content-Encoding"), shown)
    if inflater is None and response.length is not None and response.length > max_bytes:
        reason = f"Content-Length {response.length} is over the limit of {max_bytes} bytes"
        raise FetchError(TOO_LARGE, shown, reason)

    over_limit = FetchError(TOO_LARGE, shown, f"body is over the limit of {max_bytes} bytes")
    pieces: list[bytes] = []
    received = size = 0
    while chunk := response.read(_READ_BYTES):
        received += len(chunk)
        if received > max_bytes:
            raise over_limit
        for piece in inflater.feed(chunk) if inflater else (chunk,):
            size += len(piece)
            if size > max_bytes:
                raise over_limit
            pieces.append(piece)
    if response.length:
        # read(amt) returns b"" at an early end of the body instead of raising IncompleteRead.
        reason = f"transfer broken {response.length} bytes short of the Content-Length"
        raise FetchError(FETCH_FAILED, shown, reason)
    if inflater is not None:
        inflater.finish()
    return b"".join(pieces)


class _Inflater:
    """Decodes a gzip or deflate body in bounded pieces, so that output is counted as it grows."""

    def __init__(self, coding: str, shown: str) -> None:
        self._gzip = coding == "gzip"
        self._shown = shown
        self._z = self._decompressor()

    @classmethod
    def for_encoding(cls, header: str | None, shown: str) -> _Inflater | None:
        codings = [c.strip().lower() for c in (header or "").split(",")]
        codings = [c for c in codings if c not in ("", "identity")]
        if not codings:
            return None
        if len(codings) == 1 and codings[0] in ("gzip", "x-gzip", "deflate"):
            return cls("deflate" if codings[0] == "deflate" else "gzip", shown)
        raise FetchError(FETCH_FAILED, shown, f"unsupported Content-Encoding {header!r}")

    def feed(self, data: bytes) -> Iterator[bytes]:
        """Yield the decoded bytes of ``data``, at most 64 KiB at a time."""
        while True:
            if self._z.eof:
                if not (self._gzip and self._z.unused_data):
                    return  # bytes after a deflate stream are ignored
                data, self._z = self._z.unused_data + data, self._decompressor()
            try:
                piece = self._z.decompress(data, _INFLATE_PIECE_BYTES)
            except zlib.error as exc:
                raise FetchError(
                    FETCH_FAILED, self._shown, f"corrupt compressed body ({exc})"
                ) from None
            data = self._z.unconsumed_tail
            if piece:
                yield piece
            # A full piece may leave output pending inside zlib even with no input left.
            if not data and len(piece) < _INFLATE_PIECE_BYTES:
                return

    def finish(self) -> None:
        if not self._z.eof:
            raise FetchError(FETCH_FAILED, self._shown, "compressed body ended early")

    def _decompressor(self) -> zlib._Decompress:
        return zlib.decompressobj(zlib.MAX_WBITS | 16 if self._gzip else zlib.MAX_WBITS)


class _TotalTimeoutError(TimeoutError):
    """The fetch ran past ``total_timeout_s``."""


class _PinnedConnection(http.client.HTTPConnection):
    """HTTP/1.1 over a socket connected to one of the target's checked addresses."""

    def __init__(self, target: _Target, limits: FetchLimits, deadline: float) -> None:
        super().__init__(target.host, target.port)
        if target.https:
            self.default_port = 443  # keeps ":443" out of the Host header
        self._target = target
        self._limits = limits
        self._deadline = deadline

    def connect(self) -> None:
        sock = self._open_socket()
        try:
            if self._target.https:
                sock.settimeout(self._timeout(self._limits.connect_timeout_s))
                context = ssl.create_default_context()
                sock = context.wrap_socket(sock, server_hostname=self._target.host)
        except BaseException:
            sock.close()
            raise
        self.sock = _DeadlineSocket(sock, self._timeout, self._limits.read_timeout_s)

    def _open_socket(self) -> socket.socket:
        errors = []
        for address in self._target.addresses:
            timeout_s = self._timeout(self._limits.connect_timeout_s)
            try:
                return socket.create_connection((address, self._target.port), timeout=timeout_s)
            except TimeoutError:
                errors.append(f"{address}: timed out after {timeout_s:g} s")
            except OSError as exc:
                errors.append(f"{address}: {exc.strerror or exc}")
        reason = f"could not connect to port {self._target.port} ({'; '.join(errors)})"
        raise FetchError(FETCH_FAILED, self._target.shown, reason)

    def _timeout(self, timeout_s: float) -> float:
        remaining_s = self._deadline - time.monotonic()
        if remaining_s <= 0:
            raise _TotalTimeoutError
        return min(timeout_s, remaining_s)


class _DeadlineSocket:
    """The few socket methods http.client uses, each bounded by the read and total timeouts.

    http.client closes a ``Connection: close`` connection as soon as the response head is read,
    while the response goes on reading the body through ``makefile``; as with a plain socket,
    the socket is really closed only when its readers are closed too.
    """

    def __init__(
        self, sock: socket.socket, timeout: Callable[[float], float], read_timeout_s: float
    ) -> None:
        self._sock = sock
        self._timeout = timeout
        self._read_timeout_s = read_timeout_s
        self._readers = 0
        self._closing = False

    def sendall(self, data: bytes) -> None:
        self._sock.settimeout(self._timeout(self._read_timeout_s))
        self._sock.sendall(data)

    def makefile(self, mode: str) -> io.BufferedReader:
        self._readers += 1
        return io.BufferedReader(_DeadlineReader(self))

    def recv_into(self, buffer: memoryview) -> int:
        self._sock.settimeout(self._timeout(self._read_timeout_s))
        return self._sock.recv_into(buffer)

    def close(self) -> None:
        self._closing = True
        self._close_when_unused()

    def reader_closed(self) -> None:
        self._readers -= 1
        self._close_when_unused()

    def _close_when_unused(self) -> None:
        if self._closing and self._readers == 0:
            self._sock.close()


class _DeadlineReader(io.RawIOBase):
    """A raw binary stream over a :class:`_DeadlineSocket`, for io.BufferedReader."""

    def __init__(self, sock: _DeadlineSocket) -> None:
        self._sock = sock

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        return self._sock.recv_into(buffer)

    def close(self) -> None:
        if not self.closed:
            self._sock.reader_closed()
        super().close()


def _decode_data_uri(url: str, max_bytes: int) -> bytes:
    """The bytes of a ``data:[<media type>][;base64],<data>`` URI."""
    shown = _shown(url)
    header, comma, payload = url[5:].partition(",")
    if not comma:
        raise FetchError(URL_REFUSED, shown, "a data: URI needs a comma before its data")
    if header.lower().endswith(";base64"):
        encoded = re.sub(rb"\s+", b"", unquote_to_bytes(payload))
        if len(encoded) // 4 * 3 > max_bytes:
            raise FetchError(TOO_LARGE, shown, f"data is over the limit of {max_bytes} bytes")
        try:
            data = base64.b64decode(encoded + b"=" * (-len(encoded) % 4), validate=True)
        except binascii.Error as exc:
            raise FetchError(URL_REFUSED, shown, f"invalid base64 in data: URI ({exc})") from None
    else:
        data = unquote_to_bytes(payload)
    if len(data) > max_bytes:
        raise FetchError(TOO_LARGE, shown, f"data is over the limit of {max_bytes} bytes")
    return data

"""services.face.fetch: safe downloads, against a local server that misbehaves on purpose."""

from __future__ import annotations

import base64
import dataclasses
import ipaddress
import shutil
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pytest

from services.face.fetch import (
    ALLOW_NETS_ENV,
    FetchError,
    FetchLimits,
    fetch,
    parse_allow_nets,
)
from services.face.imaging import ImageError, decode_image

from .conftest import (
    MIB,
    Connections,
    ContentServer,
    FakeDns,
    Trap,
    start_server,
    stop_server,
)

# No test here may connect beyond loopback or ask a real resolver: see the guard fixtures.
pytestmark = [pytest.mark.timeout(10), pytest.mark.usefixtures("connections", "dns")]

# Only 127.0.0.1 is allowed, so that the trap on 127.0.0.2 is a forbidden address.
ALLOW = [ipaddress.ip_network("127.0.0.1/32")]
SMALL = FetchLimits(max_bytes=1 * MIB, connect_timeout_s=1, read_timeout_s=1, total_timeout_s=3)


def fetch_error(url: str, limits: FetchLimits = SMALL, allow_nets: object = ALLOW) -> FetchError:
    with pytest.raises(FetchError) as caught:
        fetch(url, limits, allow_nets)  # type: ignore[arg-type]
    return caught.value


def redirect_to(server: ContentServer, target: str, status: int = 302) -> str:
    return server.url(f"/redirect?status={status}&to={quote(target, safe='')}")


# -- what a successful fetch returns ----------------------------------------------------------


def test_fetches_an_image_over_http(server: ContentServer, astronaut_png: bytes) -> None:
    assert fetch(server.url("/astronaut.png"), SMALL, ALLOW) == astronaut_png

    path, headers = server.requests[-1]
    assert path == "/astronaut.png"
    assert headers["Host"] == f"127.0.0.1:{server.server_port}"
    assert headers["Accept-Encoding"] == "identity"


def test_path_and_query_are_percent_encoded(server: ContentServer, astronaut_png: bytes) -> None:
    assert fetch(server.url("/astronaut.png?name=a b&city=Z\u00fcrich"), SMALL, ALLOW) == (
        astronaut_png
    )
    assert server.requests[-1][0] == "/astronaut.png?name=a%20b&city=Z%C3%BCrich"


def test_fetched_image_decodes_to_the_original(
    server: ContentServer, astronaut: np.ndarray
) -> None:
    pixels = decode_image(fetch(server.url("/astronaut.png"), SMALL, ALLOW))
    assert (pixels == astronaut).all()


def test_fetched_html_is_fetched_but_is_not_an_image(server: ContentServer) -> None:
    body = fetch(server.url("/page.html"), SMALL, ALLOW)
    assert body.startswith(b"<!doctype html>")
    with pytest.raises(ImageError) as caught:
        decode_image(body)
    assert caught.value.code == "bad_image"


def test_default_limits_are_documented_values() -> None:
    limits = FetchLimits()
    assert (limits.max_redirects, limits.max_bytes) == (5, 20 * MIB)
    assert (limits.connect_timeout_s, limits.read_timeout_s, limits.total_timeout_s) == (5, 10, 30)
    with pytest.raises(dataclasses.FrozenInstanceError):
        limits.max_bytes = 1  # type: ignore[misc]


@pytest.mark.parametrize("field", ["max_bytes", "read_timeout_s", "total_timeout_s"])
def test_limits_refuse_non_positive_values(field: str) -> None:
    with pytest.raises(ValueError, match=field):
        FetchLimits(**{field: 0})


# -- HTTP failures ----------------------------------------------------------------------------


@pytest.mark.parametrize(("path", "status"), [("/missing", 404), ("/broken", 500)])
def test_error_status_fails_the_fetch(server: ContentServer, path: str, status: int) -> None:
    error = fetch_error(server.url(path))
    assert error.code == "fetch_failed"
    assert str(error).startswith(f"could not fetch {server.url(path)}: HTTP {status}")


def test_silent_server_times_out_after_the_read_timeout(server: ContentServer) -> None:
    limits = dataclasses.replace(SMALL, read_timeout_s=0.3)
    started = time.monotonic()
    error = fetch_error(server.url("/silent"), limits)
    assert error.code == "fetch_failed"
    assert "timed out" in error.reason
    assert time.monotonic() - started < 2


def test_trickling_server_is_cut_off_by_the_total_timeout(server: ContentServer) -> None:
    # A byte every 50 ms never trips the read timeout; only the total timeout ends this.
    limits = dataclasses.replace(SMALL, read_timeout_s=1, total_timeout_s=0.4)
    started = time.monotonic()
    error = fetch_error(server.url("/trickle"), limits)
    assert error.code == "fetch_failed"
    assert "0.4 s in total" in error.reason
    assert time.monotonic() - started < 1.5


def test_closed_port_fails_to_connect() -> None:
    unused = Trap()  # a port that nothing listens on once closed
    port = unused.port
    unused.sock.close()
    error = fetch_error(f"http://127.0.0.1:{port}/", allow_nets=ALLOW)
    assert error.code == "fetch_failed"
    assert "could not connect" in error.reason


def test_body_shorter_than_content_length_is_a_broken_transfer(server: ContentServer) -> None:
    error = fetch_error(server.url("/long-length"))
    assert error.code == "fetch_failed"
    assert "transfer broken" in error.reason


# -- the byte limit ---------------------------------------------------------------------------


def test_content_length_over_the_limit_is_refused_before_the_body(server: ContentServer) -> None:
    error = fetch_error(server.url("/huge-length"))
    assert error.code == "too_large"
    assert f"Content-Length {50 * MIB}" in error.reason


def test_only_the_declared_length_is_read(server: ContentServer) -> None:
    # The server sends 256 KiB after declaring 100 bytes; the excess is never taken in.
    assert fetch(server.url("/short-length"), SMALL, ALLOW) == bytes(100)


@pytest.mark.parametrize("path", ["/chunked", "/until-close"])
def test_body_without_length_stops_at_the_limit(server: ContentServer, path: str) -> None:
    error = fetch_error(server.url(path))
    assert error.code == "too_large"
    assert str(error) == (
        f"stopped fetching {server.url(path)}: body is over the limit of {MIB} bytes"
    )
    assert fetch(server.url(path), dataclasses.replace(SMALL, max_bytes=5 * MIB), ALLOW) == (
        b"x" * 4 * MIB
    )


def test_gzip_bomb_stops_at_the_limit_of_decoded_bytes(server: ContentServer) -> None:
    started = time.monotonic()
    error = fetch_error(server.url("/gzip-bomb"))
    assert error.code == "too_large"
    assert time.monotonic() - started < 1


@pytest.mark.parametrize("path", ["/gzip.png", "/deflate.png"])
def test_compressed_body_is_decoded(server: ContentServer, astronaut_png: bytes, path: str) -> None:
    assert fetch(server.url(path), SMALL, ALLOW) == astronaut_png


def test_truncated_gzip_body_fails(server: ContentServer) -> None:
    error = fetch_error(server.url("/gzip-cut.png"))
    assert error.code == "fetch_failed"
    assert "ended early" in error.reason


def test_unknown_content_encoding_fails(server: ContentServer) -> None:
    error = fetch_error(server.url("/brotli.png"))
    assert error.code == "fetch_failed"
    assert "'br'" in error.reason


# -- redirects --------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_redirect_to_an_image_is_followed(
    server: ContentServer, astronaut_png: bytes, status: int
) -> None:
    assert fetch(redirect_to(server, "/astronaut.png", status), SMALL, ALLOW) == astronaut_png
    assert [path for path, _ in server.requests][-1] == "/astronaut.png"


def test_redirect_to_a_private_address_is_refused_before_connecting(
    server: ContentServer, connections: Connections
) -> None:
    url = redirect_to(server, "http://10.0.0.1/x")
    error = fetch_error(url)
    assert error.code == "url_refused"
    assert str(error) == (
        f"refused http://10.0.0.1/x (redirected from {url}): 10.0.0.1 is a private address"
    )
    assert connections.attempts == [("127.0.0.1", server.server_port)]


def test_redirect_to_a_listening_forbidden_address_never_reaches_it(
    server: ContentServer, trap: Trap
) -> None:
    error = fetch_error(redirect_to(server, trap.url("/secret")))
    assert error.code == "url_refused"
    assert "127.0.0.2 is a loopback address" in error.reason
    assert trap.accepted() == 0


def test_the_trap_does_count_connections(trap: Trap) -> None:
    # Without this, a trap that never counts would make the test above pass vacuously.
    limits = dataclasses.replace(SMALL, read_timeout_s=0.1)  # the trap never answers
    fetch_error(trap.url(), limits, allow_nets=[ipaddress.ip_network("127.0.0.0/8")])
    assert trap.accepted() == 1


@pytest.mark.parametrize(
    "location", ["file:///etc/passwd", "ftp://127.0.0.1/x", "data:,hello", "gopher://x/"]
)
def test_redirect_to_another_scheme_is_refused(server: ContentServer, location: str) -> None:
    error = fetch_error(redirect_to(server, location))
    assert error.code == "url_refused"
    assert "is not http or https" in error.reason


def test_redirect_loop_is_detected(server: ContentServer) -> None:
    error = fetch_error(server.url("/loop-a"))
    assert error.code == "fetch_failed"
    assert "redirect loop" in error.reason
    assert [path for path, _ in server.requests] == ["/loop-a", "/loop-b"]


def test_five_redirects_are_followed_and_six_are_too_many(
    server: ContentServer, astronaut_png: bytes
) -> None:
    assert fetch(server.url("/chain/5"), SMALL, ALLOW) == astronaut_png

    error = fetch_error(server.url("/chain/6"))
    assert error.code == "fetch_failed"
    assert "too many redirects (more than 5)" in error.reason
    assert server.requests[-1][0] == "/chain/1"


def test_no_redirects_allowed(server: ContentServer) -> None:
    error = fetch_error(server.url("/chain/1"), dataclasses.replace(SMALL, max_redirects=0))
    assert error.code == "fetch_failed"
    assert "too many redirects" in error.reason


def test_redirect_without_location_fails(server: ContentServer) -> None:
    error = fetch_error(server.url("/no-location"))
    assert error.code == "fetch_failed"
    assert "without a Location" in error.reason


# -- addresses that are never fetched ---------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "reason"),
    [
        ("10.0.0.1", "10.0.0.1 is a private address"),
        ("172.16.0.1", "172.16.0.1 is a private address"),
        ("192.168.1.1", "192.168.1.1 is a private address"),
        ("127.0.0.1", "127.0.0.1 is a loopback address"),
        ("[::1]", "::1 is a loopback address"),
        ("169.254.169.254", "169.254.169.254 is a cloud metadata address"),
        ("[fd00:ec2::254]", "fd00:ec2::254 is a cloud metadata address"),
        ("169.254.1.1", "169.254.1.1 is a link-local address"),
        ("[fe80::1]", "fe80::1 is a link-local address"),
        ("100.64.0.1", "100.64.0.1 is a shared (CGNAT) address"),
        ("224.0.0.1", "224.0.0.1 is a multicast address"),
        ("[ff02::1]", "ff02::1 is a multicast address"),
        ("0.0.0.0", "0.0.0.0 is an unspecified address"),
        ("[::]", ":: is an unspecified address"),
        ("240.0.0.1", "240.0.0.1 is a private address"),
        ("192.0.2.1", "192.0.2.1 is a private address"),
        ("[fc00::1]", "fc00::1 is a private address"),
        ("[::ffff:127.0.0.1]", "embeds 127.0.0.1, a loopback address"),
        ("[::ffff:169.254.169.254]", "embeds 169.254.169.254, a cloud metadata address"),
        ("[::ffff:10.0.0.1]", "embeds 10.0.0.1, a private address"),
        ("[64:ff9b::10.0.0.1]", "embeds 10.0.0.1, a private address"),
        ("[2002:a00:1::]", "embeds 10.0.0.1, a private address"),
        ("[::127.0.0.1]", "is a deprecated IPv4-compatible address"),
    ],
)
def test_non_public_addresses_are_refused_without_connecting(
    host: str, reason: str, connections: Connections, dns: FakeDns
) -> None:
    url = f"http://{host}/latest/meta-data"
    error = fetch_error(url, allow_nets=[])
    assert error.code == "url_refused"
    assert str(error) == f"refused {url}: {error.reason}"
    assert reason in error.reason
    assert connections.attempts == []
    assert dns.lookups == []


@pytest.mark.parametrize(
    "host",
    [
        "2130706433",
        "0x7f000001",
        "0X7F000001",
        "0177.0.0.1",
        "017700000001",
        "127.1",
        "127.0.1",
        "0x7f.1",
        "127.0.0.01",
        "10.1",
        "0x7f.0.0.0x1",
    ],
)
def test_other_spellings_of_ipv4_are_refused(
    host: str, connections: Connections, dns: FakeDns
) -> None:
    # Refused even though all of 127.0.0.0/8 is allowed: a spelling is refused, not guessed at.
    error = fetch_error(f"http://{host}/", allow_nets=[ipaddress.ip_network("127.0.0.0/8")])
    assert error.code == "url_refused"
    assert "is not a dotted-decimal IPv4 address" in error.reason
    assert connections.attempts == []
    assert dns.lookups == []


def test_full_width_digits_are_read_as_the_address_they_spell(connections: Connections) -> None:
    error = fetch_error("http://\uff11\uff12\uff17.\uff10.\uff10.\uff11/", allow_nets=[])
    assert error.code == "url_refused"
    assert error.reason == "127.0.0.1 is a loopback address"
    assert connections.attempts == []


def test_a_name_with_any_forbidden_address_is_refused(
    connections: Connections, dns: FakeDns
) -> None:
    dns.add("mixed.test", ["127.0.0.1", "10.1.2.3"])
    error = fetch_error("http://mixed.test/x.jpg")
    assert error.code == "url_refused"
    assert error.reason == "10.1.2.3 is a private address"
    assert connections.attempts == []


def test_the_checked_address_is_the_one_connected_to(
    server: ContentServer, trap: Trap, connections: Connections, dns: FakeDns
) -> None:
    # A rebinding resolver answers the allowed address first and the forbidden one after.
    dns.add("rebind.test", ["127.0.0.1"], ["127.0.0.2"])
    url = f"http://rebind.test:{server.server_port}/host"

    assert fetch(url, SMALL, ALLOW) == f"rebind.test:{server.server_port}".encode()
    assert dns.lookups == ["rebind.test"]
    assert connections.attempts == [("127.0.0.1", server.server_port)]
    assert trap.accepted() == 0


def test_unresolvable_name_fails(dns: FakeDns) -> None:
    error = fetch_error("http://nowhere.test/x.jpg")
    assert error.code == "fetch_failed"
    assert "could not resolve 'nowhere.test'" in error.reason


# -- what a URL may look like -----------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "file:///etc/passwd",
        "ftp://127.0.0.1/x",
        "gopher://127.0.0.1:70/_GET",
        "javascript:alert(1)",
        "//127.0.0.1/x",
        "127.0.0.1/x",
        "",
    ],
)
def test_unsupported_schemes_are_refused(url: str, connections: Connections) -> None:
    error = fetch_error(url)
    assert error.code == "url_refused"
    assert "is not http or https" in error.reason
    assert connections.attempts == []


@pytest.mark.parametrize(
    "url",
    [
        "http://user:hunter2@127.0.0.1:{port}/astronaut.png",
        "http://user@127.0.0.1:{port}/astronaut.png",
        "http://evil.test\\@127.0.0.1:{port}/astronaut.png",
    ],
)
def test_credentials_in_the_url_are_refused(
    server: ContentServer, connections: Connections, url: str
) -> None:
    error = fetch_error(url.format(port=server.server_port))
    assert error.code == "url_refused"
    assert error.reason == "credentials in the URL are not allowed"
    assert "hunter2" not in str(error)
    assert "user" not in str(error)
    assert connections.attempts == []


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http:///x", "has no host"),
        ("http://127.0.0.1:0/", "port 0"),
        ("http://127.0.0.1:99999/", "malformed URL"),
        ("http://exa mple.test/", "whitespace or control characters"),
        ("http://127.0.0.1\n.test/", "whitespace or control characters"),
        ("http://127.0.0.1/x\ty", "whitespace or control characters"),
        ("http://[::1/", "malformed URL"),
        ("http://bad_name!.test/", "is not a valid host name"),
    ],
)
def test_malformed_urls_are_refused(url: str, reason: str) -> None:
    error = fetch_error(url)
    assert error.code == "url_refused"
    assert reason in error.reason


# -- data: URIs -------------------------------------------------------------------------------


def test_base64_data_uri(astronaut_png: bytes, connections: Connections) -> None:
    encoded = base64.b64encode(astronaut_png).decode()
    assert fetch(f"data:image/png;base64,{encoded}", SMALL) == astronaut_png
    wrapped = "\n".join(encoded[i : i + 76] for i in range(0, len(encoded), 76))
    assert fetch(f"DATA:image/png;BASE64,{wrapped}", SMALL) == astronaut_png
    assert fetch("data:;base64,aGk", SMALL) == b"hi"  # padding left out
    assert connections.attempts == []


def test_percent_encoded_data_uri() -> None:
    assert fetch("data:,hello%20world") == b"hello world"
    assert fetch("data:text/plain;charset=utf-8,%E2%9C%93") == "\u2713".encode()
    assert fetch("data:,") == b""


@pytest.mark.parametrize(
    ("url", "code"),
    [
        ("data:image/png;base64", "url_refused"),
        ("data:image/png;base64,not*base64!", "url_refused"),
        ("data:;base64," + base64.b64encode(bytes(MIB + 3)).decode(), "too_large"),
        ("data:," + "x" * (MIB + 1), "too_large"),
    ],
)
def test_bad_data_uris_fail(url: str, code: str) -> None:
    error = fetch_error(url)
    assert error.code == code
    assert len(str(error)) < 400  # the URL is shortened in the message


# -- the allow list ---------------------------------------------------------------------------


def test_allow_list_is_read_from_the_environment(
    server: ContentServer, astronaut_png: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(ALLOW_NETS_ENV, "192.0.2.0/24, 127.0.0.1/32")
    assert fetch(server.url("/astronaut.png"), SMALL) == astronaut_png

    monkeypatch.delenv(ALLOW_NETS_ENV)
    assert fetch_error(server.url("/astronaut.png"), allow_nets=None).code == "url_refused"


def test_bad_allow_list_in_the_environment_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ALLOW_NETS_ENV, "10.0.0.0/33")
    with pytest.raises(ValueError, match=f"{ALLOW_NETS_ENV}: '10.0.0.0/33' is not a CIDR"):
        fetch("http://10.0.0.1/")


def test_parse_allow_nets() -> None:
    assert parse_allow_nets(" 10.0.0.0/8 ,fd00::/8,, 192.0.2.7") == [
        ipaddress.ip_network("10.0.0.0/8"),
        ipaddress.ip_network("fd00::/8"),
        ipaddress.ip_network("192.0.2.7/32"),
    ]
    assert parse_allow_nets("") == []


@pytest.mark.parametrize("text", ["10.0.0.0/33", "10.0.0.1/8", "localhost", "10.0.0.0/8;"])
def test_parse_allow_nets_names_the_bad_entry(text: str) -> None:
    with pytest.raises(ValueError, match=f"{text!r} is not a CIDR network"):
        parse_allow_nets(f"192.0.2.0/24,{text}")


# -- https ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is needed to make a test certificate")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-nodes", "-days", "2", "-subj", "/CN=images.test"),
            *("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"),
            *("-addext", "subjectAltName=DNS:images.test", "-keyout", str(key), "-out", str(cert)),
        ],
        check=True,
        capture_output=True,
        timeout=30,
    )
    return cert, key


@pytest.fixture(scope="module")
def https_server(
    certificate: tuple[Path, Path], astronaut_png: bytes, astronaut_jpeg: bytes
) -> Iterator[ContentServer]:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(*certificate)
    server = start_server(astronaut_png, astronaut_jpeg, context)
    yield server
    stop_server(server)


def test_https_verifies_the_name_on_the_checked_address(
    https_server: ContentServer,
    certificate: tuple[Path, Path],
    astronaut_jpeg: bytes,
    dns: FakeDns,
    connections: Connections,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SSL_CERT_FILE", str(certificate[0]))
    dns.add("images.test", ["127.0.0.1"])
    port = https_server.server_port

    assert fetch(f"https://images.test:{port}/astronaut.jpg", SMALL, ALLOW) == astronaut_jpeg
    assert fetch(f"https://images.test:{port}/host", SMALL, ALLOW) == f"images.test:{port}".encode()
    assert set(connections.attempts) == {("127.0.0.1", port)}


def test_https_refuses_a_certificate_for_another_name(
    https_server: ContentServer, certificate: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SSL_CERT_FILE", str(certificate[0]))
    error = fetch_error(f"https://127.0.0.1:{https_server.server_port}/astronaut.jpg")
    assert error.code == "fetch_failed"
    assert "TLS failed" in error.reason


def test_https_refuses_an_untrusted_certificate(
    https_server: ContentServer, dns: FakeDns, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    empty_store = tmp_path / "none.pem"
    empty_store.write_text("")
    monkeypatch.setenv("SSL_CERT_FILE", str(empty_store))
    monkeypatch.setenv("SSL_CERT_DIR", str(tmp_path))
    dns.add("images.test", ["127.0.0.1"])
    error = fetch_error(f"https://images.test:{https_server.server_port}/astronaut.jpg")
    assert error.code == "fetch_failed"
    assert "certificate verify failed" in error.reason

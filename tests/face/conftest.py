"""Fixtures for the face engine's download side: test images, a local HTTP server with
misbehaving routes, a trap listener, and guards that keep every connection on loopback."""

from __future__ import annotations

import gzip
import io
import ipaddress
import socket
import socketserver
import threading
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import numpy as np
import pytest
import skimage.data
from PIL import Image

MIB = 1024 * 1024
STREAM_PIECE = b"x" * (64 * 1024)


@pytest.fixture(scope="session")
def astronaut() -> np.ndarray:
    return skimage.data.astronaut()


@pytest.fixture(scope="session")
def astronaut_png(astronaut: np.ndarray) -> bytes:
    return encode(Image.fromarray(astronaut), "PNG")


@pytest.fixture(scope="session")
def astronaut_jpeg(astronaut: np.ndarray) -> bytes:
    return encode(Image.fromarray(astronaut), "JPEG", quality=90)


def encode(image: Image.Image, fmt: str, **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


# -- guards: every connection and name lookup a test makes is recorded and kept local --------
# test_fetch uses both for every test; they are not autouse, so other tests here are unaffected.


@dataclass
class Connections:
    """Addresses passed to socket.connect during a test."""

    attempts: list[tuple[str, int]] = field(default_factory=list)


@pytest.fixture
def connections(monkeypatch: pytest.MonkeyPatch) -> Connections:
    record = Connections()
    real_connect = socket.socket.connect

    def connect(self: socket.socket, address: tuple[str, int]) -> None:
        host, port = address[0], address[1]
        record.attempts.append((host, port))
        if not ipaddress.ip_address(host).is_loopback:
            raise AssertionError(f"a test tried to connect to {host} port {port}")
        real_connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    return record


@dataclass
class FakeDns:
    """Names a test may resolve; IP literals pass through, any other name fails."""

    names: dict[str, list[list[str]]] = field(default_factory=dict)
    lookups: list[str] = field(default_factory=list)

    def add(self, name: str, *answers: list[str]) -> None:
        """Answer ``name`` with each list in turn, the last one from then on."""
        self.names[name] = list(answers)


@pytest.fixture
def dns(monkeypatch: pytest.MonkeyPatch) -> FakeDns:
    fake = FakeDns()
    real_getaddrinfo = socket.getaddrinfo

    def getaddrinfo(host: str, port: int, *args: object, **kwargs: object) -> list[tuple]:
        try:
            ipaddress.ip_address(host)
        except ValueError:
            pass
        else:
            return real_getaddrinfo(host, port, *args, **kwargs)  # type: ignore[arg-type]
        fake.lookups.append(host)
        answers = fake.names.get(host)
        if not answers:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        ips = answers.pop(0) if len(answers) > 1 else answers[0]
        return [_addrinfo(ip, port) for ip in ips]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return fake


def _addrinfo(ip: str, port: int) -> tuple:
    if ipaddress.ip_address(ip).version == 6:
        return (socket.AF_INET6, socket.SOCK_STREAM, 6, "", (ip, port, 0, 0))
    return (socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, port))


# -- a listener on a loopback address that the tests do not allow ------------------------------


class Trap:
    """A listening socket on 127.0.0.2 that counts the connections it was sent."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.2", 0))
        self.sock.listen(8)
        self.sock.setblocking(False)
        self.port = self.sock.getsockname()[1]

    def url(self, path: str = "/") -> str:
        return f"http://127.0.0.2:{self.port}{path}"

    def accepted(self) -> int:
        """Connections made to the trap so far (a completed connect is queued at once)."""
        count = 0
        while True:
            try:
                conn, _ = self.sock.accept()
            except BlockingIOError:
                return count
            conn.close()
            count += 1


@pytest.fixture
def trap() -> Iterator[Trap]:
    listener = Trap()
    yield listener
    listener.sock.close()


# -- the content server ---------------------------------------------------------------------


Route = Callable[["Handler"], None]


class ContentServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, routes: dict[str, Route], context: object = None) -> None:
        self.routes = routes
        self.requests: list[tuple[str, dict[str, str]]] = []
        self.release = threading.Event()
        self.tls_context = context
        super().__init__(("127.0.0.1", 0), Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind looks its own name up (getfqdn); nothing here needs it.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = "127.0.0.1", self.server_address[1]

    def get_request(self) -> tuple[socket.socket, object]:
        conn, address = super().get_request()
        if self.tls_context is not None:
            conn = self.tls_context.wrap_socket(conn, server_side=True)  # type: ignore[attr-defined]
        return conn, address

    def handle_error(self, request: object, client_address: object) -> None:
        """Clients hang up mid-body on purpose (limits, timeouts); that is not an error here."""

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server_port}{path}"


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: ContentServer

    def do_GET(self) -> None:
        self.server.requests.append((self.path, dict(self.headers)))
        path = urlsplit(self.path).path
        prefix = path.rsplit("/", 1)[0] + "/"
        route = self.server.routes.get(path) or self.server.routes.get(prefix)
        if route is None:
            self.send_error(404)
        else:
            route(self)

    def log_message(self, format: str, *args: object) -> None:
        """Keep the test output quiet."""

    def query(self, name: str) -> str:
        return parse_qs(urlsplit(self.path).query)[name][0]

    def reply(self, status: int, body: bytes = b"", **headers: str) -> None:
        self.send_response(status)
        fields = {name.replace("_", "-"): value for name, value in headers.items()}
        fields.setdefault("Content-Length", str(len(body)))
        for name, value in fields.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def redirect(self, location: str, status: int = 302) -> None:
        self.reply(status, Location=location)

    def stream(self, pieces: int, chunked: bool) -> None:
        """Send ``pieces`` of 64 KiB, with chunked framing or until the connection closes."""
        for _ in range(pieces):
            if chunked:
                self.wfile.write(b"%x\r\n%s\r\n" % (len(STREAM_PIECE), STREAM_PIECE))
            else:
                self.wfile.write(STREAM_PIECE)
        if chunked:
            self.wfile.write(b"0\r\n\r\n")


def _routes(png: bytes, jpeg: bytes) -> dict[str, Route]:
    bomb = gzip.compress(bytes(16 * MIB), compresslevel=9)
    gzipped_png = gzip.compress(png)

    def silent(h: Handler) -> None:
        h.server.release.wait(10)

    def trickle(h: Handler) -> None:
        h.send_response(200)
        h.send_header("Content-Length", "10000")
        h.end_headers()
        while not h.server.release.wait(0.05):  # one byte per 50 ms, until the test is over
            h.wfile.write(b"x")
            h.wfile.flush()

    def chunked(h: Handler) -> None:
        h.send_response(200)
        h.send_header("Transfer-Encoding", "chunked")
        h.end_headers()
        h.stream(pieces=64, chunked=True)

    def until_close(h: Handler) -> None:
        h.send_response(200)
        h.send_header("Connection", "close")
        h.end_headers()
        h.close_connection = True
        h.stream(pieces=64, chunked=False)

    def long_length(h: Handler) -> None:
        h.send_response(200)
        h.send_header("Content-Length", "100000")
        h.end_headers()
        h.wfile.write(b"only ten b")
        h.close_connection = True

    def chain(h: Handler) -> None:
        left = int(h.path.rsplit("/", 1)[1])
        if left == 0:
            h.reply(200, png, Content_Type="image/png")
        else:
            h.redirect(f"/chain/{left - 1}")

    return {
        "/astronaut.png": lambda h: h.reply(200, png, Content_Type="image/png"),
        "/astronaut.jpg": lambda h: h.reply(200, jpeg, Content_Type="image/jpeg"),
        "/page.html": lambda h: h.reply(200, b"<!doctype html><h1>Hello</h1>"),
        "/host": lambda h: h.reply(200, h.headers["Host"].encode()),
        "/missing": lambda h: h.send_error(404),
        "/broken": lambda h: h.send_error(500),
        "/silent": silent,
        "/trickle": trickle,
        "/short-length": lambda h: h.reply(200, bytes(256 * 1024), Content_Length="100"),
        "/long-length": long_length,
        "/huge-length": lambda h: h.reply(200, b"", Content_Length=str(50 * MIB)),
        "/chunked": chunked,
        "/until-close": until_close,
        "/gzip-bomb": lambda h: h.reply(200, bomb, Content_Encoding="gzip"),
        "/gzip.png": lambda h: h.reply(200, gzipped_png, Content_Encoding="gzip"),
        "/deflate.png": lambda h: h.reply(200, zlib.compress(png), Content_Encoding="deflate"),
        "/gzip-cut.png": lambda h: h.reply(200, gzipped_png[:-500], Content_Encoding="gzip"),
        "/brotli.png": lambda h: h.reply(200, png, Content_Encoding="br"),
        "/redirect": lambda h: h.redirect(h.query("to"), int(h.query("status"))),
        "/no-location": lambda h: h.reply(302),
        "/loop-a": lambda h: h.redirect("/loop-b"),
        "/loop-b": lambda h: h.redirect("/loop-a"),
        "/chain/": chain,
    }


def start_server(png: bytes, jpeg: bytes, context: object = None) -> ContentServer:
    server = ContentServer(_routes(png, jpeg), context)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}).start()
    return server


def stop_server(server: ContentServer) -> None:
    server.release.set()
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def module_server(astronaut_png: bytes, astronaut_jpeg: bytes) -> Iterator[ContentServer]:
    server = start_server(astronaut_png, astronaut_jpeg)
    yield server
    stop_server(server)


@pytest.fixture
def server(module_server: ContentServer) -> ContentServer:
    module_server.requests.clear()
    return module_server

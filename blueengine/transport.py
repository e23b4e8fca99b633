"""Credit-based links between a producer (a bound ROUTER) and its consumers (DEALERs).

A consumer asks before it is sent anything, so no queue grows past the windows consumers grant:
a slow replica holds at most its window while a fast one takes the rest. Endpoints are ZeroMQ
addresses; a `tcp://name:port` whose name resolves to several addresses (a headless Service, a
scaled compose service) is one link per address, re-resolved as replicas come and go.
"""

from __future__ import annotations

import logging
import os
import socket
import tempfile
import time
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import zmq

from blueengine import protocol
from blueengine.errors import TransportError

logger = logging.getLogger(__name__)

HELLO_INTERVAL_S = 0.25
RESOLVE_INTERVAL_S = 2.0
LEAVE_QUIET_S = 10.0
DRAIN_SILENCE_S = 1.0
# Below this size copying a frame is cheaper than tracking a zero-copy send.
ZERO_COPY_MIN_BYTES = 64 * 1024
# Bytes a producer lets wait in one consumer's socket, whatever its item window (one item
# always fits): small items batch freely, 16 MiB arrays do not pile up.
MAX_UNTAKEN_BYTES = 8 * 1024 * 1024


def private_ipc_dir(prefix: str = "blueengine-") -> str:
    """A fresh directory for ipc sockets that only the owner can enter."""
    path = tempfile.mkdtemp(prefix=prefix)
    os.chmod(path, 0o700)
    return path


def configure(sock: zmq.Socket[bytes]) -> None:
    """Options every socket of ours shares: no linger on close, dead peers noticed."""
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.HEARTBEAT_IVL, 1000)
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 5000)
    sock.setsockopt(zmq.RECONNECT_IVL, 50)
    sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)


def bind(sock: zmq.Socket[bytes], endpoint: str) -> str:
    """Bind and return the endpoint actually bound (a `tcp://host:0` gets its port)."""
    try:
        sock.bind(endpoint)
    except zmq.ZMQError as exc:
        raise TransportError(f"cannot bind {endpoint}: {exc}") from exc
    bound = sock.getsockopt(zmq.LAST_ENDPOINT)
    assert isinstance(bound, bytes)
    return bound.decode()


def resolve(endpoint: str) -> list[str]:
    """Every concrete address behind an endpoint: one per A/AAAA record of a tcp host name."""
    if not endpoint.startswith("tcp://"):
        return [endpoint]
    parts = urlsplit(endpoint)
    host, port = parts.hostname, parts.port
    if host is None or port is None:
        raise TransportError(f"endpoint {endpoint!r} needs a host and a port")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror:
        return []  # not resolvable yet: a Service with no ready pods has no addresses.
    addresses = sorted({str(info[4][0]) for info in infos})
    return [f"tcp://[{a}]:{port}" if ":" in a else f"tcp://{a}:{port}" for a in addresses]


def send_frames(sock: zmq.Socket[bytes], frames: Sequence[bytes | memoryview]) -> None:
    """Send a multipart message, zero-copy only for the large frames."""
    last = len(frames) - 1
    for index, frame in enumerate(frames):
        flags = zmq.SNDMORE if index < last else 0
        copy = len(frame) < ZERO_COPY_MIN_BYTES
        sock.send(frame, flags, copy=copy)


@dataclass
class _Consumer:
    window: int = 0
    sent: int = 0
    taken: int = 0
    stopped: bool = False
    sizes: deque[int] = field(default_factory=deque)  # bytes of each item not yet taken
    untaken_bytes: int = 0

    @property
    def credit(self) -> int:
        if self.stopped:
            return 0
        untaken = self.sent - self.taken
        if untaken and self.untaken_bytes >= MAX_UNTAKEN_BYTES:
            return 0  # large items: the byte budget binds before the item window does
        return self.window - untaken

    def sent_one(self, size: int) -> None:
        self.sent += 1
        self.sizes.append(size)
        self.untaken_bytes += size

    def took(self, count: int) -> None:
        self.taken += count
        for _ in range(min(count, len(self.sizes))):
            self.untaken_bytes -= self.sizes.popleft()


class Producer:
    """The sending side of a hop: hands items only to consumers that granted credit."""

    def __init__(self, context: zmq.Context[zmq.Socket[bytes]], endpoint: str) -> None:
        self.socket: zmq.Socket[bytes] = context.socket(zmq.ROUTER)
        configure(self.socket)
        # Sending to a consumer that is gone must raise, so its credit is dropped, not wasted.
        self.socket.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.endpoint = bind(self.socket, endpoint)
        self.consumers: dict[bytes, _Consumer] = {}

    def handle(self) -> None:
        """Read every pending credit message without blocking."""
        while self.socket.poll(0):
            frames = self.socket.recv_multipart()
            self._on_message(frames[0], frames[1], frames[2:])

    def _on_message(self, identity: bytes, kind: bytes, args: list[bytes]) -> None:
        consumer = self.consumers.setdefault(identity, _Consumer())
        if kind == protocol.HELLO:
            consumer.window = protocol.unpack(args[0])
            consumer.stopped = False
            self._answer(identity, protocol.WELCOME)
        elif kind == protocol.TAKE:
            consumer.took(protocol.unpack(args[0]))
        elif kind == protocol.STOP:
            consumer.stopped = True
            self._answer(identity, protocol.STOPPED)

    def _answer(self, identity: bytes, kind: bytes) -> None:
        try:
            self.socket.send_multipart([identity, kind])
        except zmq.ZMQError:
            self.consumers.pop(identity, None)

    def pick(self) -> bytes | None:
        """The consumer with the most free credit, or None when nobody asked for work."""
        best, best_credit = None, 0
        for identity, consumer in self.consumers.items():
            if consumer.credit > best_credit:
                best, best_credit = identity, consumer.credit
        return best

    def send(self, identity: bytes, frames: Sequence[bytes | memoryview]) -> bool:
        """Send one item to `identity`; False when that consumer has gone."""
        try:
            self.socket.send(identity, zmq.SNDMORE)
            send_frames(self.socket, frames)
        except zmq.ZMQError as exc:
            if exc.errno != zmq.EHOSTUNREACH:
                raise
            self.consumers.pop(identity, None)
            return False
        self.consumers[identity].sent_one(sum(len(f) for f in frames))
        return True

    def untaken(self) -> int:
        """Items sent that a live consumer has not confirmed taking out of its socket yet.

        Consumers that are gone are forgotten first: a dead replica never takes what it held (the
        hub retries that work), and waiting for it would hold a drain to its deadline.
        """
        for identity, consumer in list(self.consumers.items()):
            if consumer.sent > consumer.taken:
                # A probe to a peer whose connection is gone fails at once (ROUTER_MANDATORY).
                self._answer(identity, protocol.WELCOME)
        return sum(c.sent - c.taken for c in self.consumers.values())

    def close(self) -> None:
        self.socket.close(linger=0)


@dataclass
class Link:
    """One consumer DEALER connected to one producer address."""

    address: str
    socket: zmq.Socket[bytes]
    untold: int = 0  # items taken but not yet reported with TAKE
    untold_bytes: int = 0
    last_heard: float = field(default_factory=time.monotonic)
    last_hello: float = field(default_factory=time.monotonic)
    stopped: bool = False


class Consumer:
    """The receiving side of a hop: one link per producer address, each granting `window`."""

    def __init__(
        self,
        context: zmq.Context[zmq.Socket[bytes]],
        identity: bytes,
        endpoints: Iterable[str],
        window: int,
    ) -> None:
        self.context = context
        self.identity = identity
        self.endpoints = list(endpoints)
        self.window = window
        self.links: dict[zmq.Socket[bytes], Link] = {}
        self.version = 0  # grows whenever a link is added or closed
        self.stopping = False
        self._resolved_at = 0.0
        self.refresh()

    def refresh(self) -> None:
        """Connect to producer addresses that appeared; drop links to ones that left."""
        self._resolved_at = time.monotonic()
        wanted = {a for e in self.endpoints for a in resolve(e)}
        current = {link.address: sock for sock, link in self.links.items()}
        for address in wanted - current.keys():
            self._connect(address)
        now = time.monotonic()
        for address in current.keys() - wanted:
            link = self.links[current[address]]
            # Items a leaving producer already sent still sit in this socket; closing it at once
            # would drop them, so a link goes only once it has been quiet for a while.
            if now - link.last_heard > LEAVE_QUIET_S:
                logger.info("Producer %s left; closing its link.", address)
                self.links.pop(current[address]).socket.close(linger=0)
                self.version += 1

    def _connect(self, address: str) -> None:
        sock: zmq.Socket[bytes] = self.context.socket(zmq.DEALER)
        configure(sock)
        sock.setsockopt(zmq.ROUTING_ID, self.identity)
        sock.connect(address)
        self.links[sock] = Link(address, sock)
        self.version += 1
        self._hello(self.links[sock])

    def _hello(self, link: Link) -> None:
        link.socket.send_multipart([protocol.HELLO, protocol.pack(self.window)])

    def set_window(self, window: int) -> None:
        """Grant a new window on every link (the replica sizes it to its speed)."""
        if window == self.window:
            return
        self.window = window
        if not self.stopping:
            for link in self.links.values():
                self._hello(link)

    def should_report(self, sock: zmq.Socket[bytes]) -> bool:
        """Whether enough items were taken on this link that the producer may run short."""
        return self._running_short(self.links[sock])

    def receive(self, sock: zmq.Socket[bytes]) -> list[zmq.Frame] | None:
        """The next item on a readable link as frames (envelope first), or None."""
        frames: list[zmq.Frame] = sock.recv_multipart(copy=False)
        link = self.links[sock]
        link.last_heard = time.monotonic()
        kind = frames[0].bytes
        if kind == protocol.STOPPED:
            link.stopped = True
            return None
        if kind == protocol.WELCOME:
            return None
        if kind != protocol.ITEM:
            logger.warning("Unknown message kind %r from %s; dropped.", kind, link.address)
            return None
        link.untold += 1
        link.untold_bytes += sum(len(frame) for frame in frames)
        return frames[1:]

    def flush(self, only_short: bool = False) -> None:
        """Report taken items, so producers can send more.

        With `only_short`, only links whose producer may be running short of credit report:
        a TAKE wakes the producer's process, which on a busy machine costs the next item its
        latency. The rest report within HELLO_INTERVAL_S (`keep_alive`).
        """
        for link in self.links.values():
            if link.untold and not (only_short and not self._running_short(link)):
                self._tell(link)

    def _running_short(self, link: Link) -> bool:
        # The producer's two limits: the item window and the byte budget per consumer.
        return link.untold * 2 >= self.window or link.untold_bytes * 2 >= MAX_UNTAKEN_BYTES

    def _tell(self, link: Link) -> None:
        link.socket.send_multipart([protocol.TAKE, protocol.pack(link.untold)])
        link.untold = 0
        link.untold_bytes = 0

    def keep_alive(self, now: float) -> None:
        """Re-announce credit on quiet links: a restarted producer has forgotten ours."""
        if now - self._resolved_at > RESOLVE_INTERVAL_S and any(
            e.startswith("tcp://") for e in self.endpoints
        ):
            self.refresh()
        if self.stopping:
            return
        for link in self.links.values():
            if now - max(link.last_heard, link.last_hello) > HELLO_INTERVAL_S:
                link.last_hello = now
                if link.untold:
                    self._tell(link)
                self._hello(link)

    def stop(self) -> None:
        """Ask every producer to stop; items already sent still arrive, then STOPPED."""
        self.flush()
        self.stopping = True
        for link in self.links.values():
            link.socket.send_multipart([protocol.STOP])

    @property
    def all_stopped(self) -> bool:
        """Every producer confirmed it sent its last item here, or has gone silent.

        A silent producer is gone (or stuck); waiting for it would hold the drain to its
        deadline, and whatever it had sent is retried by the hub from its ledger.
        """
        now = time.monotonic()
        return all(
            link.stopped or now - link.last_heard > DRAIN_SILENCE_S for link in self.links.values()
        )

    def close(self) -> None:
        for sock in self.links:
            sock.close(linger=0)
        self.links.clear()
        self.version += 1

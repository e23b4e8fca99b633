"""Credit links on real sockets: nothing is sent without credit; addresses come and go."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import pytest
import zmq

from blueengine import protocol, transport
from blueengine.transport import Consumer, Producer
from tests.conftest import wait_until


@pytest.fixture
def context() -> Iterator[zmq.Context[zmq.Socket[bytes]]]:
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    yield ctx
    ctx.term()


def pump(producer: Producer) -> bytes | None:
    producer.handle()
    return producer.pick()


def next_item(consumer: Consumer, sock: zmq.Socket[bytes]) -> bytes:
    """The envelope frame of the next item on a link, skipping protocol replies."""
    while True:
        assert sock.poll(5000), "no item arrived"
        frames = consumer.receive(sock)
        if frames is not None:
            return frames[0].bytes


def test_a_producer_sends_only_against_credit_and_prefers_the_freest_consumer(context):
    producer = Producer(context, "tcp://127.0.0.1:0")
    slow = Consumer(context, b"slow", [producer.endpoint], window=1)
    fast = Consumer(context, b"fast", [producer.endpoint], window=3)
    try:
        wait_until(lambda: pump(producer) is not None and len(producer.consumers) == 2)
        sent: list[bytes] = []
        while (target := pump(producer)) is not None:
            producer.send(target, [protocol.ITEM, b"item"])
            sent.append(target)
        assert sorted(sent) == [b"fast", b"fast", b"fast", b"slow"]
        assert sent[0] == b"fast"

        (link,) = fast.links.values()
        assert next_item(fast, link.socket) == b"item"
        assert pump(producer) is None, "taking an item grants nothing until it is reported"
        fast.flush()
        wait_until(lambda: pump(producer) == b"fast", what="credit after TAKE")
    finally:
        slow.close()
        fast.close()
        producer.close()


def test_stop_is_answered_after_every_item_sent_before_it(context):
    producer = Producer(context, "tcp://127.0.0.1:0")
    consumer = Consumer(context, b"leaving", [producer.endpoint], window=2)
    try:
        wait_until(lambda: pump(producer) is not None)
        producer.send(b"leaving", [protocol.ITEM, b"one"])
        producer.send(b"leaving", [protocol.ITEM, b"two"])
        consumer.stop()
        wait_until(lambda: (producer.handle(), producer.consumers[b"leaving"].stopped)[1])
        assert pump(producer) is None

        (link,) = consumer.links.values()
        assert [next_item(consumer, link.socket), next_item(consumer, link.socket)] == [
            b"one",
            b"two",
        ]
        while not link.stopped:
            assert link.socket.poll(5000), "STOPPED never came"
            assert consumer.receive(link.socket) is None
    finally:
        consumer.close()
        producer.close()


def test_a_host_name_with_several_addresses_is_one_link_each(context, monkeypatch):
    addresses = ["10.1.0.7", "10.1.0.8"]

    def fake_getaddrinfo(host, port, *args, **kwargs):
        assert host == "square.engine.svc"
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port)) for a in addresses]

    monkeypatch.setattr(transport.socket, "getaddrinfo", fake_getaddrinfo)
    monkeypatch.setattr(transport, "LEAVE_QUIET_S", 0.0)
    consumer = Consumer(context, b"me", ["tcp://square.engine.svc:5555"], window=2)
    try:
        assert sorted(link.address for link in consumer.links.values()) == [
            "tcp://10.1.0.7:5555",
            "tcp://10.1.0.8:5555",
        ]
        addresses[:] = ["10.1.0.8", "10.1.0.9"]
        time.sleep(0.001)  # a link must be quiet for LEAVE_QUIET_S (0 here) before it goes
        consumer.refresh()
        assert sorted(link.address for link in consumer.links.values()) == [
            "tcp://10.1.0.8:5555",
            "tcp://10.1.0.9:5555",
        ]
    finally:
        consumer.close()


def test_a_name_that_does_not_resolve_yet_is_no_link_rather_than_an_error(context):
    consumer = Consumer(context, b"me", ["tcp://no-such-host.invalid:5555"], window=2)
    try:
        assert consumer.links == {}
    finally:
        consumer.close()

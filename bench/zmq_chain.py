"""The chain in raw pyzmq: PUSH/PULL over ipc, the floor under any ZeroMQ design.

Each process binds a PULL socket and pushes to the next one's. Frames of 64 KiB or more are sent
zero-copy (``frame.buffer`` with ``copy=False``: re-sending the received `zmq.Frame` itself
stalled chains on these machines), smaller ones are copied. The source and the sink use
BlueEngine's codec, so both ends cost what a step's ends cost; the forwarders either pass the
frames on untouched (`decode=False`, pure transport) or decode and re-encode every item as a
step must (`decode=True`), which separates the codec's share of a hop from the protocol's.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Sequence
from multiprocessing.process import BaseProcess
from typing import Any

import msgpack
import zmq

from bench.chain import CHECK_INTERVAL_S, JOB_TIMEOUT_S, Closing, check_alive, spawn_all
from bench.payloads import latency_ns, new_item
from blueengine import codec

ZERO_COPY_MIN_BYTES = 64 * 1024
NAME = "raw pyzmq"
NAME_WITH_CODEC = "raw pyzmq + codec"


def _socket(context: zmq.Context[zmq.Socket[bytes]], kind: int, depth: int) -> zmq.Socket[bytes]:
    sock: zmq.Socket[bytes] = context.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, depth)
    sock.setsockopt(zmq.RCVHWM, depth)
    return sock


def _send(sock: zmq.Socket[bytes], frames: Sequence[Any]) -> None:
    last = len(frames) - 1
    for index, frame in enumerate(frames):
        view = frame.buffer if isinstance(frame, zmq.Frame) else frame
        copy = memoryview(view).nbytes < ZERO_COPY_MIN_BYTES
        sock.send(view, zmq.SNDMORE if index < last else 0, copy=copy)


def run_source(commands: str, downstream: str, depth: int) -> None:
    """Turn each command ``[kind, n]`` into n stamped items."""
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    inbox, outbox = _socket(context, zmq.PULL, depth), _socket(context, zmq.PUSH, depth)
    inbox.bind(commands)
    outbox.connect(downstream)
    while True:
        kind, count = msgpack.unpackb(inbox.recv())
        for index in range(count):
            _send(outbox, codec.encode(new_item(kind, index == count - 1)))


def run_forwarder(upstream: str, downstream: str, depth: int, decode: bool) -> None:
    """Pass every item on, decoding and re-encoding it first when `decode`."""
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    inbox, outbox = _socket(context, zmq.PULL, depth), _socket(context, zmq.PUSH, depth)
    inbox.bind(upstream)
    outbox.connect(downstream)
    while True:
        frames = inbox.recv_multipart(copy=False)
        if decode:
            _send(outbox, codec.encode(codec.decode(frames)))
        else:
            _send(outbox, frames)


def run_sink(upstream: str, results: str, depth: int) -> None:
    """Decode every item; report the in-chain latency of each job's last one."""
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    inbox, outbox = _socket(context, zmq.PULL, depth), _socket(context, zmq.PUSH, 1000)
    inbox.bind(upstream)
    outbox.connect(results)
    while True:
        item: Any = codec.decode(inbox.recv_multipart(copy=False))
        if item[1]:
            outbox.send(msgpack.packb(latency_ns(item)))


class ZmqChain(Closing):
    """source -> `hops` forwarders -> sink as processes, driven over two more sockets."""

    def __init__(self, hops: int, depth: int, decode: bool = False) -> None:
        self.name = NAME_WITH_CODEC if decode else NAME
        self._dir = tempfile.mkdtemp(prefix="bench-zmq-")
        addresses = [f"ipc://{self._dir}/{index}" for index in range(hops + 3)]
        self._context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self._commands = _socket(self._context, zmq.PUSH, 1000)
        self._results = _socket(self._context, zmq.PULL, 1000)
        self._results.bind(addresses[-1])
        self._commands.connect(addresses[0])

        plans: list[tuple[Any, tuple[Any, ...]]] = [
            (run_source, (addresses[0], addresses[1], depth))
        ]
        for index in range(1, hops + 1):
            plans.append((run_forwarder, (addresses[index], addresses[index + 1], depth, decode)))
        plans.append((run_sink, (addresses[hops + 1], addresses[-1], depth)))
        self._processes: list[BaseProcess] = spawn_all(plans)
        try:
            self.one_item("small")  # returns once every process is up and connected
        except BaseException:
            self.close()
            raise

    def run_jobs(self, kind: str, jobs: int, items_per_job: int) -> float:
        start = time.perf_counter()
        for _ in range(jobs):
            self._commands.send(msgpack.packb([kind, items_per_job]))
        for _ in range(jobs):
            self._result()
        return time.perf_counter() - start

    def one_item(self, kind: str) -> tuple[int, int]:
        start = time.perf_counter_ns()
        self._commands.send(msgpack.packb([kind, 1]))
        in_chain = self._result()
        return in_chain, time.perf_counter_ns() - start

    def _result(self) -> int:
        deadline = time.monotonic() + JOB_TIMEOUT_S
        while not self._results.poll(int(CHECK_INTERVAL_S * 1000)):
            check_alive(self.name, self._processes)
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name}: no result in {JOB_TIMEOUT_S} s")
        value: int = msgpack.unpackb(self._results.recv())
        return value

    def pids(self) -> list[int]:
        return [process.pid for process in self._processes if process.pid is not None]

    def close(self) -> None:
        # Nothing is in flight when the benchmark closes a chain, so the processes can just go.
        for process in self._processes:
            process.terminate()
        for process in self._processes:
            process.join(5)
        self._commands.close()
        self._results.close()
        self._context.term()
        shutil.rmtree(self._dir, ignore_errors=True)

"""The runtime of one step replica: take items on credit, run the step function, pass on outputs.

One thread owns every socket. With `concurrency=1` the step function runs on that thread too, so a
hop costs no thread switch; with more, worker threads run it and hand their outputs back in order
through a bounded queue, which blocks them when the next step has no room.

For each item the replica reports one ACK record to the hub after everything the item produced
(outputs, forwarded children) has been sent, so the hub's ledger of the job settles only once the
whole item is through.
"""

from __future__ import annotations

import ctypes
import logging
import os
import queue
import signal
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

import zmq

from blueengine import codec, outputs, protocol
from blueengine.context import Context
from blueengine.engine import StepSpec
from blueengine.errors import ChannelError, CodecError
from blueengine.jobs import new_item_id
from blueengine.protocol import Envelope
from blueengine.stats import ReplicaStats
from blueengine.transport import Consumer, Producer, configure
from blueengine.types import CONTROL, FORWARD, StepFunc

logger = logging.getLogger(__name__)

RECORDS_BATCH = 64
RECORDS_DELAY_S = 0.002
WINDOW_TARGET_S = 0.005
MAX_WINDOW = 64
POLL_MS = 100
DROPPED_MEMORY = 100_000  # cancelled jobs remembered per replica


@dataclass(frozen=True)
class ReplicaPlan:
    """Everything a replica process needs to know: what to run and where its peers are."""

    engine: str
    spec: StepSpec
    index: int
    replica_id: str
    hub: str
    upstream: tuple[str, ...]
    outbox: str | None
    first: bool
    allow_pickle: bool = False
    drain_timeout_s: float = 30.0
    heartbeat_s: float = 1.0
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def title(self) -> str:
        return f"blueengine {self.engine} {self.spec.name}[{self.index}]"

    @property
    def window(self) -> int:
        # One item in hand and one waiting per worker keeps a worker busy without hoarding.
        return self.spec.concurrency + 1


class _Dropped(Exception):
    """The item's job was cancelled or ended while it was being processed."""


@dataclass
class _Work:
    envelope: Envelope
    data: Any
    sent: Counter[str] = field(default_factory=Counter)
    xor: int = 0


class Replica:
    """One process of one step."""

    def __init__(self, plan: ReplicaPlan) -> None:
        self.plan = plan
        self.spec = plan.spec
        self.zmq = zmq.Context()
        self.hub = self.zmq.socket(zmq.DEALER)
        configure(self.hub)
        self.hub.setsockopt(zmq.ROUTING_ID, plan.replica_id.encode())
        self.hub.connect(plan.hub)
        identity = plan.replica_id.encode()
        self.consumer = Consumer(self.zmq, identity, plan.upstream, plan.window)
        self.producer = Producer(self.zmq, plan.outbox) if plan.outbox else None
        self.records: list[tuple[Any, ...]] = []
        self.dropped: OrderedDict[str, int] = OrderedDict()
        self.func: StepFunc = self.spec.load_func()
        self.context = Context(
            step=self.spec.name,
            replica=plan.index,
            config=self.spec.config,
            logger=logging.getLogger(f"blueengine.step.{self.spec.name}"),
            is_cancelled=self._cancelled,
        )
        self.terminating = False
        self.bye_acked = False
        self._workers: _WorkerPool | None = None
        self._socket_thread = threading.get_ident()
        self._records_due = 0.0
        self._hub_check_due = 0.0
        self._outputs_pending = False  # an OUT record waits in `records`
        self.stats = ReplicaStats()
        self._poller_key: tuple[int, bool] | None = None
        self._cached_poller = zmq.Poller()
        # Signals write to this pipe, so a SIGTERM wakes the loop at once instead of at its
        # next poll timeout.
        self._signals, signal_writer = os.pipe()
        os.set_blocking(signal_writer, False)
        self.signal_writer = signal_writer

    # -- life cycle --------------------------------------------------------------------------

    def run(self) -> None:
        """Set up, serve until told to stop, drain, and close."""
        setup = self.spec.load_setup()
        if setup is not None:
            self.context.resources = setup(self.context)
        if self.spec.concurrency > 1:
            self._workers = _WorkerPool(self)
        self._send_hub(protocol.HELLO, protocol.pack(self._hello_info()))
        heartbeat = _Heartbeat(self.zmq, self.plan, self._stats_snapshot)
        logger.info("Step %s replica %d is ready.", self.spec.name, self.plan.index)
        try:
            self._serve()
            self._drain()
        finally:
            heartbeat.stop()
            self.close()

    def request_stop(self, signum: int = 0, frame: FrameType | None = None) -> None:
        self.terminating = True

    def close(self) -> None:
        if self._workers is not None:
            self._workers.stop()
        self.consumer.close()
        if self.producer is not None:
            self.producer.close()
        self.hub.close(linger=0)
        self.zmq.term()
        os.close(self._signals)
        os.close(self.signal_writer)

    def _stats_snapshot(self) -> dict[str, Any]:
        # Read from the heartbeat thread: ints and floats read whole under the GIL, and a
        # snapshot a moment stale is fine for metrics.
        if self.producer is not None:
            self.stats.credits = sum(max(0, c.credit) for c in self.producer.consumers.values())
        return self.stats.snapshot()

    def _hello_info(self) -> dict[str, Any]:
        return {"step": self.spec.name, "index": self.plan.index, "pid": os.getpid()}

    # -- the loop ----------------------------------------------------------------------------

    def _serve(self) -> None:
        while not self.terminating:
            self._turn()

    def _turn(self, timeout_ms: int = POLL_MS) -> None:
        """Wait for something to do, once, and do it."""
        poller = self._poller()
        ready = dict(poller.poll(0))
        if not ready:
            # About to wait: report what was taken and done first, so that nobody waits on us.
            # Under load this point is rarely reached and reports travel in batches.
            self.consumer.flush(only_short=True)
            self.flush_records()
            waited_from = time.perf_counter()
            ready = dict(poller.poll(timeout_ms))
            self.stats.waiting_s += time.perf_counter() - waited_from
        if self._signals in ready:
            os.read(self._signals, 512)
        if self.hub in ready:
            self._handle_hub()
        if self.producer is not None and self.producer.socket in ready:
            self.producer.handle()
        if self._workers is not None and self._workers.wake in ready:
            self._workers.deliver()
        for sock in list(self.consumer.links):
            if sock in ready and self._has_room():
                self._take_from(sock)
        self.consumer.keep_alive(time.monotonic())

    def _poller(self) -> zmq.Poller:
        # Built again only when the links or the room to take work change: this runs per item.
        key = (self.consumer.version, self._has_room())
        if key != self._poller_key:
            self._poller_key, self._cached_poller = key, self._build_poller()
        return self._cached_poller

    def _build_poller(self) -> zmq.Poller:
        poller = zmq.Poller()
        poller.register(self._signals, zmq.POLLIN)
        poller.register(self.hub, zmq.POLLIN)
        if self.producer is not None:
            poller.register(self.producer.socket, zmq.POLLIN)
        if self._workers is not None:
            poller.register(self._workers.wake, zmq.POLLIN)
        if self._has_room():
            for sock in self.consumer.links:
                poller.register(sock, zmq.POLLIN)
        return poller

    def _has_room(self) -> bool:
        return self._workers is None or self._workers.has_room()

    def _take_from(self, sock: zmq.Socket[bytes]) -> None:
        while self._has_room() and sock.poll(0):
            frames = self.consumer.receive(sock)
            if frames is None:
                continue
            if self.consumer.should_report(sock):
                self.consumer.flush()
            self._accept(frames)
            self._flush_if_due()
            self._resize_window()

    def _resize_window(self) -> None:
        # Grant each producer about WINDOW_TARGET_S of work: fast steps get deep windows and
        # batch their messages, slow ones hold little, so a slow replica is never buried while
        # a fast one idles. Powers of two, so the window (and its HELLOs) changes rarely.
        if self.stats.recent_item_s == 0.0:
            return  # nothing measured yet: keep the cautious window
        per_item_s = self.stats.recent_item_s / self.spec.concurrency
        wanted = self.spec.concurrency + WINDOW_TARGET_S / max(per_item_s, 1e-7)
        window = 1 << max(0, int(wanted).bit_length() - 1)
        self.consumer.set_window(min(MAX_WINDOW, max(self.plan.window, window)))

    def _accept(self, frames: list[zmq.Frame]) -> None:
        envelope = Envelope.unpack(frames[0].buffer)
        self.stats.items_in += 1
        if self.is_dropped(envelope.job_id, envelope.attempt):
            self.stats.dropped += 1
            return
        try:
            data = codec.decode(frames[1:], allow_pickle=self.plan.allow_pickle)
        except CodecError as exc:
            self.fail(envelope, exc)
            return
        work = _Work(envelope, {CONTROL: data} if self.plan.first else {FORWARD: data})
        if self._workers is not None:
            self._workers.submit(work)
        else:
            self.execute(work, self.context)

    # -- running one item --------------------------------------------------------------------

    def execute(self, work: _Work, context: Context) -> None:
        """Run the step function on one item and pass on all it writes."""
        context.job_id, context.attempt = work.envelope.job_id, work.envelope.attempt
        work.xor = work.envelope.item_id
        started, blocked_before = time.perf_counter(), self.stats.blocked_s
        self.stats.in_flight = 1
        try:
            for output in outputs.iterate(self.func(context, work.data)):
                self.emit(work, self.check_output(output))
        except _Dropped:
            self.stats.dropped += 1
            return
        except Exception as exc:  # user code: the job fails, the step keeps serving.
            _log_failure(self.spec.name, work.envelope, exc)
            self.fail(work.envelope, exc)
            return
        finally:
            self.stats.in_flight = 0
            blocked = self.stats.blocked_s - blocked_before
            self.stats.observe(time.perf_counter() - started - blocked)
        self.ack(work)

    def ack(self, work: _Work) -> None:
        """Report an item done, with the children it sent and where they went."""
        self.records.append(
            (protocol.ACK, work.envelope.job_id, work.envelope.attempt, work.xor, dict(work.sent))
        )

    def emit(self, work: _Work, output: Mapping[str, Any]) -> None:
        """Pass on one output dict of the step function (runs on the socket thread)."""
        envelope = work.envelope
        now = time.monotonic()
        if now >= self._hub_check_due:
            # A cancel may have arrived while the step function ran; looking costs a system
            # call, so at most once a millisecond.
            self._hub_check_due = now + 0.001
            if self.hub.poll(0):
                self._handle_hub()
        if self.is_dropped(envelope.job_id, envelope.attempt):
            raise _Dropped
        for channel, value in output.items():
            if channel == FORWARD:
                self._forward(work, value)
            else:
                self._outputs_pending = True
                self.records.append(
                    (
                        protocol.OUT,
                        envelope.job_id,
                        envelope.attempt,
                        channel,
                        outputs.to_json(self.spec.name, channel, value),
                    )
                )
                self._flush_if_due()

    def check_output(self, output: object) -> Mapping[str, Any]:
        return outputs.check(self.spec, output, last=self.producer is None)

    def _forward(self, work: _Work, value: Any) -> None:
        try:
            frames = codec.encode(value, allow_pickle=self.plan.allow_pickle)
        except CodecError as exc:
            raise CodecError(f"step {self.spec.name!r} cannot forward: {exc}") from None
        child = Envelope(
            work.envelope.job_id, work.envelope.attempt, new_item_id(), work.envelope.deadline
        )
        if self._outputs_pending:
            # Outputs reach the hub before the work they caused, so Status order is causal.
            self.flush_records()
        target = self._send_when_credited(child, frames)
        self.stats.items_out += 1
        work.sent[target] += 1
        work.xor ^= child.item_id

    def _send_when_credited(self, envelope: Envelope, frames: list[Any]) -> str:
        assert self.producer is not None
        packed = envelope.pack()
        blocked_from = time.perf_counter()
        while True:
            # Known credit is never too high (it only grows by messages), so read the socket
            # only when it seems to have run out.
            target = self.producer.pick()
            if target is None:
                self.producer.handle()
                target = self.producer.pick()
            if target is not None and self.producer.send(target, [protocol.ITEM, packed, *frames]):
                self.stats.blocked_s += time.perf_counter() - blocked_from
                return target.decode()
            if self.is_dropped(envelope.job_id, envelope.attempt):
                raise _Dropped
            self.consumer.flush()
            self.flush_records()
            poller = zmq.Poller()
            poller.register(self.producer.socket, zmq.POLLIN)
            poller.register(self.hub, zmq.POLLIN)
            if self.hub in dict(poller.poll(POLL_MS)):
                self._handle_hub()

    def fail(self, envelope: Envelope, exc: BaseException) -> None:
        self.stats.errors += 1
        self.records.append(_failure(envelope, self.spec.name, exc))

    # -- the hub -----------------------------------------------------------------------------

    def flush_records(self) -> None:
        if self.records:
            self.hub.send_multipart([protocol.RECORDS, protocol.pack(self.records)])
            self.records = []
        self._outputs_pending = False
        self._records_due = time.monotonic() + RECORDS_DELAY_S

    def _flush_if_due(self) -> None:
        # Records wait a little to travel in batches, but never long: the hub completes jobs
        # from them, so their delay is the jobs' latency.
        if len(self.records) >= RECORDS_BATCH or time.monotonic() >= self._records_due:
            self.flush_records()

    def _send_hub(self, kind: bytes, body: bytes = b"") -> None:
        self.hub.send_multipart([kind, body])

    def _handle_hub(self) -> None:
        while self.hub.poll(0):
            kind, body = self.hub.recv_multipart()
            if kind == protocol.CANCEL:
                for job_id, attempt in protocol.unpack(body):
                    self._drop(job_id, attempt)
            elif kind == protocol.BYE:
                self.bye_acked = True
            elif kind == protocol.COMMAND:
                self._run_command(protocol.unpack(body))

    def _drop(self, job_id: str, attempt: int) -> None:
        self.dropped[job_id] = max(attempt, self.dropped.get(job_id, 0))
        self.dropped.move_to_end(job_id)
        while len(self.dropped) > DROPPED_MEMORY:
            self.dropped.popitem(last=False)

    def _cancelled(self, job_id: str, attempt: int) -> bool:
        # Only the socket thread may read the hub socket; workers see what it has read.
        if threading.get_ident() == self._socket_thread and self.hub.poll(0):
            self._handle_hub()
        return self.is_dropped(job_id, attempt)

    def is_dropped(self, job_id: str, attempt: int) -> bool:
        """Whether items of this attempt are to be dropped (safe from worker threads)."""
        return self.dropped.get(job_id, 0) >= attempt

    def _run_command(self, command: Any) -> None:
        if not self.spec.takes_control or self.plan.first:
            return
        context = self.context.for_job(None, 0)
        try:
            for output in outputs.iterate(self.func(context, {CONTROL: command})):
                for channel, value in self.check_output(output).items():
                    if channel != FORWARD:
                        outputs.to_json(self.spec.name, channel, value)
        except Exception:
            logger.exception("Step %s failed on command %r.", self.spec.name, command)

    # -- drain -------------------------------------------------------------------------------

    def _drain(self) -> None:
        """Stop intake, finish what was sent here, hand everything on, then say goodbye."""
        deadline = time.monotonic() + self.plan.drain_timeout_s
        logger.info("Step %s replica %d is draining.", self.spec.name, self.plan.index)

        self.consumer.stop()
        while not self.consumer.all_stopped and time.monotonic() < deadline:
            self._turn(timeout_ms=50)
        if self._workers is not None:
            self._workers.join(deadline)

        while self.producer is not None and self.producer.untaken() and time.monotonic() < deadline:
            self._turn(timeout_ms=50)

        self.flush_records()
        self._send_hub(protocol.BYE)
        while not self.bye_acked and time.monotonic() < deadline:
            if self.hub.poll(50):
                self._handle_hub()
        logger.info("Step %s replica %d drained.", self.spec.name, self.plan.index)


class _WorkerPool:
    """Threads that run the step function for `concurrency > 1`.

    Workers put what a step writes into a bounded queue, in order, and wake the socket thread;
    a full queue blocks them, which is how the next step's backpressure reaches them.
    """

    def __init__(self, replica: Replica) -> None:
        self.replica = replica
        count = replica.spec.concurrency
        self.inbox: queue.Queue[_Work | None] = queue.Queue()
        self.outbox: queue.Queue[tuple[str, _Work, Any]] = queue.Queue(maxsize=4 * count)
        self.busy = 0
        self.failed: set[int] = set()  # ids of items whose outputs failed to pass on
        address = f"inproc://wake-{replica.plan.replica_id}"
        self.wake: zmq.Socket[bytes] = replica.zmq.socket(zmq.PULL)
        self.wake.bind(address)
        self._local = threading.local()
        self._address = address
        self.threads = [
            threading.Thread(target=self._work, name=f"worker-{i}", daemon=True)
            for i in range(count)
        ]
        for thread in self.threads:
            thread.start()

    def has_room(self) -> bool:
        return self.busy < len(self.threads)

    def submit(self, work: _Work) -> None:
        self.busy += 1
        self.replica.stats.in_flight = self.busy
        self.inbox.put(work)

    def deliver(self) -> None:
        """Pass on, in order, everything the workers wrote (runs on the socket thread)."""
        while self.wake.poll(0):
            self.wake.recv()
        while True:
            try:
                kind, work, value = self.outbox.get_nowait()
            except queue.Empty:
                return
            self._deliver_one(kind, work, value)

    def _deliver_one(self, kind: str, work: _Work, value: Any) -> None:
        replica = self.replica
        envelope = work.envelope
        if kind == "done":
            records, seconds = value
            self.busy -= 1
            replica.stats.in_flight = self.busy
            replica.stats.observe(seconds)
            failed = id(work) in self.failed or records
            self.failed.discard(id(work))
            if records:
                replica.stats.errors += 1
                replica.records.extend(records)
            elif not failed and not replica.is_dropped(envelope.job_id, envelope.attempt):
                replica.ack(work)
            return
        if id(work) in self.failed:
            return
        try:
            replica.emit(work, value)
        except _Dropped:
            pass
        except Exception as exc:
            replica.fail(envelope, exc)
            self.failed.add(id(work))

    def _work(self) -> None:
        sock = self.replica.zmq.socket(zmq.PUSH)
        sock.connect(self._address)
        self._local.sock = sock
        try:
            while (work := self.inbox.get()) is not None:
                self._run(work)
        finally:
            sock.close(linger=0)

    def _run(self, work: _Work) -> None:
        replica = self.replica
        envelope = work.envelope
        context = replica.context.for_job(envelope.job_id, envelope.attempt)
        work.xor = envelope.item_id  # the socket thread adds children as it sends them
        records: list[tuple[Any, ...]] = []
        started = time.perf_counter()
        try:
            for output in outputs.iterate(replica.func(context, work.data)):
                self._put("emit", work, replica.check_output(output))
                if replica.is_dropped(envelope.job_id, envelope.attempt):
                    break
        except Exception as exc:
            _log_failure(replica.spec.name, envelope, exc)
            records.append(_failure(envelope, replica.spec.name, exc))
        self._put("done", work, (records, time.perf_counter() - started))

    def _put(self, kind: str, work: _Work, value: Any) -> None:
        self.outbox.put((kind, work, value))
        self._local.sock.send(b"", zmq.NOBLOCK)

    def join(self, deadline: float) -> None:
        while self.busy and time.monotonic() < deadline:
            self.replica._turn(timeout_ms=50)

    def stop(self) -> None:
        for _ in self.threads:
            self.inbox.put(None)
        self.wake.close(linger=0)


class _Heartbeat:
    """Tells the hub this process lives, even while the step function holds the main thread.

    Each beat carries the replica's built-in stats, so metrics keep flowing during long items.
    """

    def __init__(
        self,
        context: zmq.Context[zmq.Socket[bytes]],
        plan: ReplicaPlan,
        stats: Callable[[], dict[str, Any]],
    ) -> None:
        self._stop = threading.Event()
        self._stats = stats
        self._thread = threading.Thread(
            target=self._beat, args=(context, plan), name="heartbeat", daemon=True
        )
        self._thread.start()

    def _beat(self, context: zmq.Context[zmq.Socket[bytes]], plan: ReplicaPlan) -> None:
        sock = context.socket(zmq.DEALER)
        configure(sock)
        sock.connect(plan.hub)
        try:
            while not self._stop.wait(plan.heartbeat_s):
                body = protocol.pack({"id": plan.replica_id, "stats": self._stats()})
                sock.send_multipart([protocol.BEAT, body], zmq.NOBLOCK)
        except zmq.ZMQError:
            pass
        finally:
            sock.close(linger=0)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def _log_failure(step: str, envelope: Envelope, exc: BaseException) -> None:
    # A traceback helps with a bug, not with bad input: an exception that carries a stable
    # `code` (a refused URL, a corrupt image) or an output the SDK refused is one line.
    expected = isinstance(getattr(exc, "code", None), str) or isinstance(
        exc, ChannelError | CodecError
    )
    logger.warning(
        "Step %s failed job %s: %s: %s",
        step,
        envelope.job_id,
        type(exc).__name__,
        exc,
        exc_info=not expected,
    )


def _failure(envelope: Envelope, step: str, exc: BaseException) -> tuple[Any, ...]:
    """The FAIL record for an exception; an exception's string `code` travels with it."""
    code = getattr(exc, "code", None)
    return (
        protocol.FAIL,
        envelope.job_id,
        envelope.attempt,
        step,
        type(exc).__name__,
        str(exc) or repr(exc),
        code if isinstance(code, str) else None,
    )


def die_with_parent() -> None:
    """Have the kernel SIGKILL this process when its parent dies (Linux only).

    A supervisor killed with `kill -9` cannot stop its replicas; without this they would live on,
    serving a hub that no longer exists.
    """
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:
        return
    pr_set_pdeathsig = 1
    libc.prctl(pr_set_pdeathsig, signal.SIGKILL)


def run_replica(plan: ReplicaPlan, supervised: bool = True) -> None:
    """The entry point of a replica process."""
    if supervised:
        die_with_parent()
        # A group of its own: a signal for the whole group (Ctrl-C, `timeout`, a service
        # manager) reaches only the supervisor, which stops replicas in order.
        os.setpgid(0, 0)
    from blueengine.log import configure_logging, settings_from_env

    level, json_lines = settings_from_env()
    configure_logging(f"{plan.engine} {plan.spec.name}[{plan.index}]", level, json_lines)
    try:
        import setproctitle

        setproctitle.setproctitle(plan.title)
    except ImportError:  # pragma: no cover - a dependency, but the title is only cosmetic.
        pass
    replica = Replica(plan)
    # SIGINT goes to the whole process group on Ctrl-C; the supervisor decides the order of
    # shutdown, so replicas react to SIGTERM only.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, replica.request_stop)
    signal.set_wakeup_fd(replica.signal_writer)
    replica.run()

"""The messages on the wire, in one place.

Every hop is a ROUTER (the producer, bound) and one DEALER per upstream producer in each consumer.
A consumer grants credit; the producer sends an item only against credit:

    consumer -> producer   [HELLO, window]   credit = window - (sent - taken); sent again when idle
                           [TAKE, n]         n more items left the socket for the consumer's app
                           [STOP]            send nothing more; answer STOPPED after the last item
    producer -> consumer   [ITEM, envelope, payload frames...]
                           [WELCOME]         answers HELLO: the producer is alive
                           [STOPPED]

Every replica also keeps one DEALER to the hub, which binds a ROUTER:

    replica -> hub         [RECORDS, msgpack list of records]   outputs, acks and failures, in order
                           [HELLO, msgpack info]  [BEAT, replica id]  [BYE]
    hub -> replica         [CANCEL, msgpack (job id, up to attempt)]  [BYE]  [COMMAND, payload]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgpack

HELLO = b"H"
TAKE = b"T"
STOP = b"S"
STOPPED = b"X"
WELCOME = b"W"
ITEM = b"I"
RECORDS = b"R"
BEAT = b"B"
BYE = b"Y"
CANCEL = b"C"
COMMAND = b"M"

# Record kinds inside a RECORDS batch.
OUT = "out"  # (OUT, job_id, attempt, channel, json_text)
ACK = "ack"  # (ACK, job_id, attempt, xor_of_item_and_children, {replica_id: children sent})
FAIL = "fail"  # (FAIL, job_id, attempt, step, exception_type, message, code or None)


@dataclass(frozen=True, slots=True)
class Envelope:
    """What travels in front of every item's payload: whose work it is and which piece."""

    job_id: str
    attempt: int
    item_id: int
    deadline: float | None = None

    def pack(self) -> bytes:
        return msgpack.packb((self.job_id, self.attempt, self.item_id, self.deadline))

    @classmethod
    def unpack(cls, data: bytes | memoryview) -> Envelope:
        job_id, attempt, item_id, deadline = msgpack.unpackb(data)
        return cls(job_id, attempt, item_id, deadline)


def pack(value: Any) -> bytes:
    """msgpack for the protocol's own small messages."""
    return msgpack.packb(value, use_bin_type=True)


def unpack(data: bytes | memoryview) -> Any:
    return msgpack.unpackb(data, raw=False, strict_map_key=False)

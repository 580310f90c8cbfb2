"""MQTT framing of the simulator's hot path: PUBLISH packets written and PUBACKs read without
paho, through a socket wrapper that paho also uses for everything else (CONNECT, PINGREQ,
DISCONNECT and what the broker sends besides PUBACKs).

paho 2.2 spends about 40 µs of CPU per QoS 1 message on this machine: an `MQTTMessage` and an
`MQTTMessageInfo` (a `threading.Condition`) per publish, and per PUBACK a byte-at-a-time read, a
`ReasonCode` and an MQTT 5 `Properties`. Encoding the PUBLISH here and matching a PUBACK's packet
id here costs a few µs (bench/publisher.py's raw client does the same).
"""

from __future__ import annotations

import contextlib
import errno
import socket
import struct
from collections.abc import Callable
from typing import Any

READ_SIZE = 1 << 16
QUICKACK: int | None = getattr(socket, "TCP_QUICKACK", None)  # Linux only
PUBACK = 0x40
PUBLISH_QOS0 = 0x30
PUBLISH_QOS1 = 0x32
# MQTT 5 reason codes below 0x80 are successes (0x10: accepted, no matching subscribers).
FIRST_FAILURE = 0x80
_U16 = struct.Struct("!H")


def topic_field(topic: str) -> bytes:
    """A topic as a PUBLISH carries it: two length bytes, then UTF-8."""
    raw = topic.encode()
    return _U16.pack(len(raw)) + raw


def varint(n: int) -> bytes:
    """An MQTT variable byte integer (the remaining length, property lengths)."""
    out = bytearray()
    while True:
        n, digit = n >> 7, n & 0x7F
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


def publish_packet(topic: bytes, payload: bytes, mid: int, *, v5: bool) -> bytes:
    """A PUBLISH (QoS 1 with `mid` > 0, QoS 0 with 0) of a `topic_field`, not retained, not dup.
    MQTT 5 adds an empty property list (one zero byte)."""
    props = b"\x00" if v5 else b""
    if mid:
        ident = _U16.pack(mid)
        length = len(topic) + 2 + len(props) + len(payload)
        return b"%c%b%b%b%b%b" % (PUBLISH_QOS1, varint(length), topic, ident, props, payload)
    length = len(topic) + len(props) + len(payload)
    return b"%c%b%b%b%b" % (PUBLISH_QOS0, varint(length), topic, props, payload)


def _remaining_length(data: bytes, at: int, end: int) -> tuple[int, int] | None:
    """(remaining length, bytes of its encoding) at `at`, or None when not all there yet."""
    value, mult = 0, 1
    for i in range(4):
        if at + i >= end:
            return None
        byte = data[at + i]
        value += (byte & 0x7F) * mult
        if not byte & 0x80:
            return value, i + 1
        mult *= 128
    raise ValueError("malformed remaining length")


class BufferedSocket:
    """paho's socket seen through two buffers: paho's one `send()` per packet, and the engine's
    own PUBLISH packets, append to a list that the engine writes with one `send()` per loop pass;
    reads are one large `recv()`, from which the engine takes the PUBACKs (`take_pubacks`) and
    paho's one-byte `recv()`s take the rest.

    Installed from `on_socket_open` on plain TCP only: paho 2.x touches its socket only through
    `send`, `recv`, `close`, `setblocking` and `fileno`, all of which this forwards."""

    __slots__ = ("_in", "_out", "_pos", "_quickack", "eof", "out_bytes", "sock")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._quickack = QUICKACK is not None and sock.family in (socket.AF_INET, socket.AF_INET6)
        self._out: list[bytes] = []
        self.out_bytes = 0  # written by paho or the engine, not yet taken by the kernel
        self._in = b""
        self._pos = 0
        self.eof = False

    def send(self, data: bytes | bytearray) -> int:
        self._out.append(bytes(data))
        self.out_bytes += len(data)
        return len(data)

    def fill(self) -> bool:
        """Read what the kernel has, after what is still unread; False when nothing came (and
        `eof` when the peer closed)."""
        try:
            data = self.sock.recv(READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            # A reset (a broker killed or restarted with our bytes unread), or any other socket
            # error, ends the stream as a close does: paho reads the end, reports the connection
            # lost, and it is reopened.
            data = b""
        if not data:
            self.eof = True
            return False
        self._in = self._in[self._pos :] + data if self._pos < len(self._in) else data
        self._pos = 0
        return True

    def quickack(self) -> None:
        """Acknowledge what the broker sends at once, for a while. Mosquitto leaves Nagle on
        (set_tcp_nodelay false): its next PUBACK waits for our TCP ack, which Linux delays up to
        40 ms. Quick-ack mode lapses, so it is re-armed after a read that leaves PUBACKs owed
        (one system call per such read; none when every publish is acknowledged)."""
        if self._quickack:
            self.sock.setsockopt(socket.IPPROTO_TCP, QUICKACK, 1)  # type: ignore[arg-type]

    def recv(self, size: int) -> bytes:
        if self._pos >= len(self._in):
            if self.eof:
                return b""  # paho reads the close and reports the connection lost
            if not self.fill():
                if self.eof:
                    return b""
                raise BlockingIOError(errno.EAGAIN, "no data")  # paho's MQTT_ERR_AGAIN
        start = self._pos
        self._pos = start + size
        return self._in[start : start + size]

    def take_pubacks(self, on_ack: Callable[[int, bool], None]) -> bool:
        """Hand every whole PUBACK at the head of the input to `on_ack(mid, failed)`; True
        when what follows is another packet, for paho to read."""
        data, pos, end = self._in, self._pos, len(self._in)
        try:
            while pos < end and data[pos] == PUBACK:
                found = _remaining_length(data, pos + 1, end)
                if found is None or pos + 1 + found[1] + found[0] > end:
                    break  # the rest of it is still on its way
                length, width = found
                body = pos + 1 + width
                code = data[body + 2] if length > 2 else 0
                on_ack((data[body] << 8) | data[body + 1], code >= FIRST_FAILURE)
                pos = body + length
        finally:
            self._pos = pos
        return pos < end and data[pos] != PUBACK

    @property
    def buffered(self) -> bool:
        return self._pos < len(self._in)

    @property
    def pending_out(self) -> bool:
        return bool(self._out)

    def flush(self) -> bool:
        """Write what is queued, without blocking; True when nothing is left."""
        if not self._out:
            return True
        data = self._out[0] if len(self._out) == 1 else b"".join(self._out)
        try:
            written = self.sock.send(data)
        except BlockingIOError:
            written = 0
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EWOULDBLOCK):
                written = 0
            else:
                self._out.clear()
                self.out_bytes = 0
                raise
        self._out = [data[written:]] if written < len(data) else []
        self.out_bytes = len(data) - written
        return not self._out

    def fileno(self) -> int:
        return self.sock.fileno()

    def setblocking(self, flag: bool) -> None:
        self.sock.setblocking(flag)

    def close(self) -> None:
        # paho closes right after "sending" DISCONNECT, which is still in our buffer.
        with contextlib.suppress(OSError):
            self.flush()
        self._out.clear()
        self.out_bytes = 0
        self.sock.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.sock, name)

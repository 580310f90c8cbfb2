"""A small blocking MQTT publisher for Locust's users: CONNECT, PUBLISH (QoS 0 and 1), PUBACK,
PINGREQ and DISCONNECT over one TCP socket, on `simulators.wire`'s PUBLISH encoder.

Locust runs users as greenlets on a gevent-patched `socket`, so a blocking client is cooperative
there and needs no thread and no event loop of its own. paho-mqtt works under gevent too, driven
by `loop()` in a greenlet, but costs about 40 µs of CPU per QoS 1 message on this machine (an
`MQTTMessageInfo` with a `threading.Condition` per publish, a byte-at-a-time PUBACK read; see
`simulators.wire`); a Locust worker also spends its CPU on the request events, so every
microsecond of the client is load it cannot generate (measured in bench/locust_bench.py).

Plain TCP only: a TLS listener is load-tested through the simulator (`iotbridge simulate`).
"""

from __future__ import annotations

import contextlib
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass

from simulators.wire import (
    FIRST_FAILURE,
    PUBACK,
    READ_SIZE,
    _remaining_length,
    publish_packet,
    varint,
)

CONNECT, CONNACK, PINGREQ, PINGRESP, DISCONNECT = 0x10, 0x20, 0xC0, 0xD0, 0xE0
_U16 = struct.Struct("!H")
_U32 = struct.Struct("!I")
RECEIVE_MAXIMUM = 0x21  # MQTT 5 property: how many QoS 1 publishes the server takes unacknowledged
# MQTT 5 property identifiers by the size of their value (3.1.2.3 / 3.2.2.3 of the spec).
_PROPERTY_SIZES = {
    **dict.fromkeys((0x01, 0x17, 0x19, 0x24, 0x25, 0x28, 0x29, 0x2A), 1),
    **dict.fromkeys((0x13, 0x21, 0x22, 0x23), 2),
    **dict.fromkeys((0x02, 0x11, 0x18, 0x27), 4),
}
_STRING_PROPERTIES = {0x03, 0x08, 0x09, 0x12, 0x15, 0x16, 0x1A, 0x1C, 0x1F}
_UNBOUNDED_WINDOW = 65_535


class MqttRefused(ConnectionError):
    """The broker refused the connection, or closed it with a reason."""


def _string(text: str) -> bytes:
    raw = text.encode()
    return _U16.pack(len(raw)) + raw


def connect_packet(
    client_id: str,
    *,
    v5: bool,
    keepalive_s: int,
    username: str | None = None,
    password: str | None = None,
) -> bytes:
    """A CONNECT with a clean start, no will."""
    flags = 0x02 | (0x80 if username is not None else 0) | (0x40 if password is not None else 0)
    variable = _string("MQTT") + bytes((5 if v5 else 4, flags)) + _U16.pack(keepalive_s)
    if v5:
        variable += b"\x00"  # no properties
    payload = _string(client_id)
    if username is not None:
        payload += _string(username)
    if password is not None:
        payload += _string(password)
    body = variable + payload
    return bytes((CONNECT,)) + varint(len(body)) + body


def receive_maximum(properties: bytes) -> int:
    """The Receive Maximum of a CONNACK's MQTT 5 properties (65,535 when absent)."""
    at = 0
    while at < len(properties):
        ident = properties[at]
        at += 1
        if ident == RECEIVE_MAXIMUM:
            return int(_U16.unpack_from(properties, at)[0])
        if ident in _PROPERTY_SIZES:
            at += _PROPERTY_SIZES[ident]
        elif ident in _STRING_PROPERTIES:
            at += 2 + _U16.unpack_from(properties, at)[0]
        elif ident == 0x26:  # user property: two strings
            for _ in range(2):
                at += 2 + _U16.unpack_from(properties, at)[0]
        elif ident == 0x0B:  # subscription identifier: a variable byte integer
            while properties[at] & 0x80:
                at += 1
            at += 1
        else:
            raise MqttRefused(f"CONNACK with unknown property 0x{ident:02x}")
    return _UNBOUNDED_WINDOW


@dataclass(frozen=True, slots=True)
class Endpoint:
    host: str
    port: int
    v5: bool = True
    keepalive_s: int = 30
    connect_timeout_s: float = 5.0
    username: str | None = None
    password: str | None = None


class MqttPublisher:
    """One connection. `connect()` returns the broker's Receive Maximum; `read(on_ack)` blocks
    for the next bytes and hands every PUBACK to `on_ack(mid, refused)`."""

    def __init__(self, endpoint: Endpoint, client_id: str) -> None:
        self.endpoint = endpoint
        self.client_id = client_id
        self._sock: socket.socket | None = None
        self._in = b""
        self.v5 = endpoint.v5

    @property
    def connected(self) -> bool:
        return self._sock is not None

    def connect(self) -> int:
        e = self.endpoint
        sock = socket.create_connection((e.host, e.port), timeout=e.connect_timeout_s)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.sendall(connect_packet(self.client_id, v5=e.v5, keepalive_s=e.keepalive_s,
                                        username=e.username, password=e.password))  # fmt: skip
            self._sock, self._in = sock, b""
            kind, body = self._next_packet_blocking()
        except BaseException:
            self._sock = None
            sock.close()
            raise
        if kind != CONNACK or len(body) < 2:
            self.close()
            raise MqttRefused(f"expected CONNACK, got packet type 0x{kind:02x}")
        code = body[1]
        if code:
            self.close()
            raise MqttRefused(f"CONNACK refused the connection: reason 0x{code:02x}")
        sock.settimeout(None)
        if not self.v5:
            return _UNBOUNDED_WINDOW
        length, width = _remaining_length(body, 2, len(body)) or (0, 0)
        return receive_maximum(body[2 + width : 2 + width + length])

    def _next_packet_blocking(self) -> tuple[int, bytes]:
        while True:
            packet = self._take_packet()
            if packet is not None:
                return packet
            if not self._fill():
                raise ConnectionError("the broker closed the connection")

    def _fill(self) -> bool:
        assert self._sock is not None
        data = self._sock.recv(READ_SIZE)
        if not data:
            return False
        self._in += data
        return True

    def _take_packet(self) -> tuple[int, bytes] | None:
        data = self._in
        found = _remaining_length(data, 1, len(data))
        if found is None or 1 + found[1] + found[0] > len(data):
            return None
        length, width = found
        start = 1 + width
        self._in = data[start + length :]
        return data[0] & 0xF0, data[start : start + length]

    def send(self, data: bytes) -> None:
        if self._sock is None:
            raise ConnectionError("not connected")
        self._sock.sendall(data)

    def publish(self, topic: bytes, payload: bytes, mid: int) -> None:
        """A PUBLISH of a `wire.topic_field`: QoS 1 with `mid` > 0, QoS 0 with 0."""
        self.send(publish_packet(topic, payload, mid, v5=self.v5))

    def ping(self) -> None:
        self.send(bytes((PINGREQ, 0)))

    def read(self, on_ack: Callable[[int, bool], None]) -> None:
        """Wait for the broker's next bytes and handle every whole packet in them: PUBACKs to
        `on_ack`, PINGRESP dropped. ConnectionError when the broker closes the connection (a
        DISCONNECT's reason code in the message)."""
        if not self._fill():
            self.close()
            raise ConnectionError("the broker closed the connection")
        while (packet := self._take_packet()) is not None:
            kind, body = packet
            if kind == PUBACK:
                code = body[2] if len(body) > 2 else 0
                on_ack((body[0] << 8) | body[1], code >= FIRST_FAILURE)
            elif kind == DISCONNECT:
                self.close()
                reason = f"0x{body[0]:02x}" if body else "none"
                raise MqttRefused(f"the broker disconnected: reason {reason}")

    def disconnect(self) -> None:
        if self._sock is None:
            return
        with contextlib.suppress(OSError):
            self._sock.sendall(bytes((DISCONNECT, 0)))
        self.close()

    def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()

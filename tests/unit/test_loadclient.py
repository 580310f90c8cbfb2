"""The Locust users' MQTT client and acked files: packets as the spec writes them, and the
files of several load processes read as one."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from simulators import acked
from simulators.loadclient import connect_packet, receive_maximum


def test_connect_packet_is_an_mqtt5_connect_with_clean_start_and_credentials() -> None:
    packet = connect_packet("dev-1", v5=True, keepalive_s=30, username="u", password="p")
    assert packet[0] == 0x10
    assert packet[1] == len(packet) - 2
    body = packet[2:]
    assert body[:6] == b"\x00\x04MQTT"
    assert body[6] == 5  # protocol level
    assert body[7] == 0x80 | 0x40 | 0x02  # user name, password, clean start
    assert struct.unpack("!H", body[8:10])[0] == 30
    assert body[10] == 0  # no properties
    assert body[11:] == b"\x00\x05dev-1\x00\x01u\x00\x01p"


def test_connect_packet_for_mqtt311_has_no_properties() -> None:
    packet = connect_packet("c", v5=False, keepalive_s=10)
    assert packet == b"\x10\x0d\x00\x04MQTT\x04\x02\x00\x0a\x00\x01c"


def test_receive_maximum_is_found_among_other_properties() -> None:
    # Session Expiry (4 bytes), Assigned Client Identifier (string), Receive Maximum 20,
    # a user property (two strings).
    properties = (b"\x11\x00\x00\x00\x3c" + b"\x12\x00\x03abc" + b"\x21\x00\x14"
                  + b"\x26\x00\x01k\x00\x01v")  # fmt: skip
    assert receive_maximum(properties) == 20
    assert receive_maximum(b"\x24\x01") == 65_535  # absent: no limit


def _write(path: Path, route: str, asset: str, first: int, last: int) -> None:
    with path.open("w") as out:
        acked.write(out, {"route": route}, [{"asset": asset, "acked": [[0, first, last]]}])


def test_the_files_of_several_processes_load_as_one(tmp_path: Path) -> None:
    _write(tmp_path / "w0", "telemetry", "a000001", 0, 9)
    _write(tmp_path / "w1", "telemetry", "a100001", 0, 4)
    loaded = acked.load_all([tmp_path / "w0", tmp_path / "w1"])
    assert len(loaded.acked) == 15
    assert ("a100001", 4) in loaded.acked
    assert loaded.header["route"] == "telemetry"


def test_files_of_different_routes_are_refused(tmp_path: Path) -> None:
    _write(tmp_path / "w0", "telemetry", "a000001", 0, 9)
    _write(tmp_path / "w1", "other", "a100001", 0, 4)
    with pytest.raises(ValueError, match="route 'other'"):
        acked.load_all([tmp_path / "w0", tmp_path / "w1"])
    (tmp_path / "bad").write_text(json.dumps({"format": "x"}) + "\n")
    with pytest.raises(ValueError, match="not an acked file"):
        acked.load_all([tmp_path / "w0", tmp_path / "bad"])

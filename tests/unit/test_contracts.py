from __future__ import annotations

import json
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bridge.contracts import (
    TELEMETRY,
    Contract,
    TelemetryPayload,
    build_contracts,
    validate_telemetry,
)
from config.errors import PayloadRejected
from config.settings import ContractSettings


def _reason(payload: bytes, asset: str = "a1", limit: int = 65536) -> str:
    with pytest.raises(PayloadRejected) as caught:
        validate_telemetry(payload, asset, limit)
    return caught.value.reason


def test_a_valid_payload_becomes_a_sample() -> None:
    sample = validate_telemetry(
        b'{"ts": 1767225600.25, "seq": 4, "values": {"t": 1.5, "rpm": 900}}', "a1", 1000
    )
    assert (sample.asset, sample.seq, sample.ts, sample.values) == (
        "a1",
        4,
        1767225600.25,
        {"t": 1.5, "rpm": 900.0},
    )


def test_rfc3339_timestamps_are_accepted() -> None:
    sample = validate_telemetry(
        b'{"ts": "2026-01-01T00:00:00+01:00", "seq": 0, "values": {"t": 1}}', "a1", 1000
    )
    assert sample.ts == 1767222000.0


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b'{"ts": 1, "seq": 1, "values": {"t": 1}', "json"),
        (b"\xff\xfe\x00", "json"),
        (b"", "json"),
        (b'{"ts": 1, "seq": 1, "values": {"t": NaN}}', "schema"),
        (b'{"ts": 1, "seq": 1, "values": {"t": Infinity}}', "schema"),
        (b'{"ts": 1, "seq": 1, "values": {"t": 1e400}}', "schema"),
        # An integer beyond any float: refused like 1e400, never an OverflowError.
        (b'{"ts": 1, "seq": 1, "values": {"t": 1' + b"0" * 400 + b"}}", "schema"),
        (b'{"ts": 1' + b"0" * 400 + b', "seq": 1, "values": {"t": 1}}', "schema"),
        (b'{"ts": 1, "seq": 1, "values": {"t": true}}', "schema"),
        (b'{"ts": 1, "seq": 1, "values": {"t": "1.5"}}', "schema"),
        (b'{"ts": 1, "seq": 1.5, "values": {"t": 1}}', "schema"),
        (b'{"ts": 1, "seq": -1, "values": {"t": 1}}', "schema"),
        (b'{"ts": 1, "seq": 1, "values": {}}', "schema"),
        (b'{"ts": 1, "seq": 1, "values": {"bad name": 1}}', "schema"),
        (b'{"ts": 1, "seq": 1, "values": {"t": 1}, "extra": 1}', "schema"),
        (b'{"ts": "yesterday", "seq": 1, "values": {"t": 1}}', "schema"),
        (b'{"ts": 1, "seq": 1, "values": {"t": 1}, "asset": "a2"}', "identity"),
        (b"[" * 200 + b"]" * 200, "schema"),
    ],
)
def test_bad_payloads_get_a_reason(payload: bytes, reason: str) -> None:
    assert _reason(payload) == reason


def test_size_is_checked_before_parsing() -> None:
    assert _reason(b"x" * 2000, limit=1000) == "size"


@given(st.binary(max_size=300))
def test_arbitrary_bytes_are_accepted_or_rejected_never_crash(payload: bytes) -> None:
    try:
        sample = validate_telemetry(payload, "a1", 65536)
    except PayloadRejected as exc:
        reason = exc.reason
    else:
        reason = "ok"
        assert all(math.isfinite(v) for v in sample.values.values())
    assert reason in {"ok", "json", "schema", "identity"}


@given(
    st.dictionaries(
        st.from_regex(r"[a-z][a-z0-9_]{0,10}", fullmatch=True),
        st.floats(allow_nan=True, allow_infinity=True),
        min_size=1,
        max_size=5,
    )
)
def test_only_finite_values_pass(values: dict[str, float]) -> None:
    payload = json.dumps({"ts": 1.0, "seq": 1, "values": values}).encode()
    finite = all(math.isfinite(v) for v in values.values())
    if finite:
        assert validate_telemetry(payload, "a1", 65536).values == values
    else:
        assert _reason(payload) in {"json", "schema"}


PUMP = build_contracts({
    "pump": ContractSettings.model_validate({"values": {
        "flow": {"type": "number", "unit": "m3/h", "min": 0, "max": 500},
        "running": {"type": "boolean"},
        "mode": {"type": "string", "enum": ["auto", "manual"], "required": False},
        "starts": {"type": "integer", "required": False, "min": 0},
    }})
})["pump"]  # fmt: skip


def test_a_declared_contract_types_and_bounds_each_value() -> None:
    sample = PUMP.validate(
        b'{"ts": 5, "seq": 1, "values": {"flow": 12.5, "running": true, "mode": "auto"}}',
        "p1",
        1000,
    )
    assert sample.values == {"flow": 12.5, "running": 1.0}
    assert sample.texts == {"mode": "auto"}


@pytest.mark.parametrize(
    "values",
    [
        b'{"flow": 501, "running": true}',  # above max
        b'{"flow": -1, "running": true}',  # below min
        b'{"running": true}',  # required value missing
        b'{"flow": 1, "running": 1}',  # wrong type: a number is not a boolean
        b'{"flow": 1, "running": true, "mode": "turbo"}',  # not in the enum
        b'{"flow": 1, "running": true, "starts": 1.5}',  # not an integer
        b'{"flow": 1, "running": true, "other": 3}',  # undeclared
        b'{"flow": NaN, "running": true}',
        b'{"flow": 1, "running": true, "starts": 1' + b"0" * 400 + b"}",  # beyond a double
    ],
)
def test_a_declared_contract_rejects_with_reason_schema(values: bytes) -> None:
    with pytest.raises(PayloadRejected) as caught:
        PUMP.validate(b'{"ts": 5, "seq": 1, "values": ' + values + b"}", "p1", 1000)
    assert caught.value.reason == "schema"


def test_undeclared_values_can_be_allowed_as_finite_numbers() -> None:
    open_contract = ContractSettings.model_validate({"values": {"t": {}}, "allow_undeclared": True})
    contract = build_contracts({"open": open_contract})["open"]
    sample = contract.validate(b'{"ts": 5, "seq": 1, "values": {"t": 1, "x": 2}}', "a", 1000)
    assert sample.values == {"t": 1.0, "x": 2.0}
    for undeclared in (b'"2"', b"1" + b"0" * 400):
        with pytest.raises(PayloadRejected) as caught:
            contract.validate(
                b'{"ts": 5, "seq": 1, "values": {"t": 1, "x": %b}}' % undeclared, "a", 1000
            )
        assert caught.value.reason == "schema"


def test_an_integer_field_with_a_fractional_bound_is_a_config_error() -> None:
    with pytest.raises(ValueError, match="whole numbers"):
        ContractSettings.model_validate({"values": {"n": {"type": "integer", "min": 0.5}}})


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)


@given(
    st.fixed_dictionaries(
        {},
        optional={
            "ts": st.floats() | st.integers() | st.sampled_from(["2026-01-01T00:00:00Z", "x"]),
            "seq": st.integers(min_value=-2, max_value=2**54) | st.floats(),
            "asset": st.sampled_from(["a1", "a2", "bad name"]) | st.none(),
            "values": st.dictionaries(st.sampled_from(["t", "rpm", "bad name"]), _json_values),
            "extra": _json_values,
        },
    )
)
def test_the_built_in_contract_decides_as_its_model(body: dict[str, object]) -> None:
    """The built-in contract validates into a plain dict, not a TelemetryPayload: the same outcome,
    reason and detail for any payload."""

    def outcome(contract: Contract) -> tuple[object, ...]:
        try:
            sample = contract.validate(json.dumps(body).encode(), "a1", 65536)
        except PayloadRejected as exc:
            return exc.reason, exc.detail
        return sample.asset, sample.seq, sample.ts, sample.values, sample.texts

    assert outcome(TELEMETRY) == outcome(Contract(TelemetryPayload))

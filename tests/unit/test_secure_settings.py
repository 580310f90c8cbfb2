"""Redis TLS and the HTTP section's basic auth and TLS: what a file may say, and what it turns into
(redis-py's arguments, the check of an Authorization header)."""

from __future__ import annotations

import base64

import pytest

from config import loader
from config.errors import ConfigError
from config.settings import HttpSettings, RedisSettings, Settings
from observability.http import BasicAuth


def _problems(text: str) -> dict[str, str]:
    with pytest.raises(ConfigError) as caught:
        loader.parse(text)
    return {p.path: p.message for p in caught.value.problems}


def test_redis_tls_files_with_a_plaintext_url_are_refused() -> None:
    problems = _problems("redis:\n  url: redis://cache:6379/0\n  tls: {ca_file: /etc/ca.crt}\n")
    assert problems == {"redis": "tls is set but url is not rediss://: use rediss://host:port/db"}
    assert _problems("redis:\n  url: rediss://cache:6380/0\n  tls: {cert_file: /etc/c.crt}\n") == {
        "redis.tls": "cert_file and key_file must be set together"
    }


def test_redis_client_options_carry_tls_only_for_rediss(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IOTBRIDGE_REDIS__PASSWORD", "pw-from-env")
    tls = loader.parse(
        "redis:\n  url: rediss://cache:6380/0\n  username: bridge\n  socket_timeout_s: 1.5\n"
        "  tls: {ca_file: /c/ca.crt, cert_file: /c/b.crt, key_file: /c/b.key}\n"
    ).redis
    assert tls.client_options() == {
        "username": "bridge",
        "password": "pw-from-env",
        "socket_timeout": 1.5,
        "socket_connect_timeout": 2.0,
        "ssl_ca_certs": "/c/ca.crt",
        "ssl_certfile": "/c/b.crt",
        "ssl_keyfile": "/c/b.key",
        "ssl_cert_reqs": "required",
        "ssl_check_hostname": True,
    }
    skip = RedisSettings(url="rediss://cache:6380/0", tls={"insecure_skip_verify": True})
    assert (
        skip.client_options()["ssl_cert_reqs"],
        skip.client_options()["ssl_check_hostname"],
    ) == (
        "none",
        False,
    )
    plain = RedisSettings(url="redis://cache:6379/0").client_options()
    assert not [key for key in plain if key.startswith("ssl_")]


@pytest.mark.parametrize(
    ("text", "password", "message"),
    [
        ("http:\n  username: prometheus\n", None, "username and password must be set together"),
        ("http:\n  username: ''\n", "x", "username must be non-empty and without ':' (RFC 7617)"),
        ("http:\n  username: 'a:b'\n", "x", "username must be non-empty and without ':' (RFC 7617)"),
        ("http:\n  username: prometheus\n", "", "password must not be empty"),
        ("http:\n  tls: {cert_file: /c/s.crt}\n", None, "cert_file and key_file must be set together"),
        ("http:\n  tls: {client_ca_file: /c/ca.crt}\n", None, "client_ca_file needs cert_file and key_file"),
    ],
)  # fmt: skip
def test_http_settings_come_in_pairs(
    text: str, password: str | None, message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if password is not None:
        monkeypatch.setenv("IOTBRIDGE_HTTP__PASSWORD", password)
    path = "http.tls" if "tls:" in text else "http"
    assert _problems(text) == {path: message}


def test_http_password_comes_from_the_environment_and_is_never_printed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("IOTBRIDGE_HTTP__PASSWORD", "hunter2-http")
    settings = loader.parse("http:\n  username: prometheus\n")
    assert settings.http.auth_enabled
    for text in (repr(settings), str(settings.model_dump()), loader.summary(settings)):
        assert "hunter2" not in text
    monkeypatch.delenv("IOTBRIDGE_HTTP__PASSWORD")
    assert not Settings().http.auth_enabled
    assert HttpSettings() == Settings().http


def _basic(credentials: bytes) -> bytes:
    return b"Basic " + base64.b64encode(credentials)


def test_basic_auth_accepts_only_the_exact_pair() -> None:
    auth = BasicAuth("prometheus", "s3cret:with-colon")
    assert auth.allows(_basic(b"prometheus:s3cret:with-colon"))
    assert auth.allows(b"basic " + base64.b64encode(b"prometheus:s3cret:with-colon"))
    for header in (
        None,
        b"",
        _basic(b"prometheus:wrong"),
        _basic(b"other:s3cret:with-colon"),
        _basic(b"prometheus"),
        _basic(b"prometheus:s3cret:with-colon "),
        b"Bearer " + base64.b64encode(b"prometheus:s3cret:with-colon"),
        b"Basic not*base64",
    ):
        assert not auth.allows(header), header

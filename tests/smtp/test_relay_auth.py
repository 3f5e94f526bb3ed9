"""Relay authentication and TLS trust for the queue, end to end: sendmail queues, sendmail -q
delivers to a real aiosmtpd relay on loopback. Passwords that only a password command knows,
OAuth2 tokens (XOAUTH2, OAUTHBEARER) from a token command, the provider's 334 error challenge,
TLS on connect on any port, client certificates, certificate fingerprints; every failure a
deferral with a reason that never carries the secret."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pymailtools.config import Config
from pymailtools.errors import ConfigError
from pymailtools.queue.store import STATES, Queue
from pymailtools.smtp import secret
from tests.conftest import script, write_toml
from tests.support.sasl import ERROR_CHALLENGE, SaslHandler, SaslRelay
from tests.support.smtp import Certs

USER = "me@provider.test"
PASSWORD = "Pw-only-the-command-knows-7f3a"
TOKEN = "ya29.tok-" + "Ab9_" * 300  # 1209 characters: more than one SMTP line can carry
WRONG_TOKEN = "ya29.expired-token-0c1d"


def _script(path: Path, body: str) -> str:
    """An executable shell script; its path is the command."""
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o700)
    return str(path)


class Run:
    """sendmail (queue only) then sendmail -v -q, with a configuration file of ``values``."""

    def __init__(self, tmp_path: Path, config_values: dict) -> None:
        self.tmp = tmp_path
        self.base = {**config_values, "smtp_tls_security_level": "encrypt"}
        self.queue_dir = Path(str(config_values["queue_directory"]))
        self.stderr = ""

    def __call__(self, **values: object) -> str:
        conf = write_toml(self.tmp / "relay.toml", {**self.base, **values})
        env = dict(os.environ, PYMAILTOOLS_CONFIG=str(conf), PYMAILTOOLS_DELIVERY_MODE="queue")
        p = subprocess.run([script("sendmail"), "-f", "alice@sender.test", "bob@far.test"],
                           input=b"Subject: relay auth\n\nbody\n", env=env,
                           capture_output=True, timeout=60)
        assert p.returncode == 0, p.stderr
        p = subprocess.run([script("sendmail"), "-v", "-q"], env=env, capture_output=True,
                           timeout=60)
        assert p.returncode == 0, p.stderr
        self.stderr = p.stderr.decode(errors="replace")
        return self.stderr

    def reasons(self) -> list[tuple[str, str]]:
        """(status, reason) of every recipient still queued."""
        q = Queue(str(self.queue_dir))
        return [(r.status, r.reason) for s in STATES for i in q.ids(s)
                for r in q.load(i, s)[1].recipients]

    def files(self) -> list[bytes]:
        return [p.read_bytes() for p in self.queue_dir.rglob("*") if p.is_file()]

    def nowhere(self, *secrets: str) -> None:
        """No secret (nor its base64 in an AUTH line) in the log, a reason or a queue file."""
        texts = [self.stderr.encode(), *[r.encode() for _, r in self.reasons()], *self.files()]
        for s in secrets:
            forms = [s.encode(), base64.b64encode(f"\0{USER}\0{s}".encode())]
            for text in texts:
                for f in forms:
                    assert f not in text


@pytest.fixture
def send(tmp_path: Path, config_values: dict) -> Run:
    return Run(tmp_path, config_values)


@pytest.fixture
def relay(certs: Certs, request: pytest.FixtureRequest) -> Iterator[SaslRelay]:
    """STARTTLS relay accepting USER with PASSWORD or TOKEN."""
    r = SaslRelay(SaslHandler(USER, PASSWORD, TOKEN), certs.server_context())
    yield r
    r.stop()


# -- password command ----------------------------------------------------------------------------

@pytest.mark.parametrize("mechanism", ["plain", "login"])
def test_password_only_the_command_knows(send: Run, relay: SaslRelay, tmp_path: Path,
                                         mechanism: str) -> None:
    cmd = _script(tmp_path / "pw", f"echo '{PASSWORD}'\necho second line is ignored\n")
    log = send(relayhost=relay.hop, smtp_sasl_username=USER,
               smtp_sasl_password_command=cmd, smtp_sasl_mechanism_filter=mechanism)
    assert "status=sent" in log, log
    assert relay.handler.attempts == [(mechanism.upper(), True)]
    assert [(m[2], m[3]) for m in relay.handler.messages] == [(USER, True)]
    send.nowhere(PASSWORD)


def test_shell_only_when_written_as_sh_c(send: Run, relay: SaslRelay, tmp_path: Path) -> None:
    store = tmp_path / "store"
    store.write_text(f"user {USER}\npass {PASSWORD}\n")
    log = send(relayhost=relay.hop, smtp_sasl_username=USER,
               smtp_sasl_password_command=f"sh -c 'grep ^pass {store} | cut -d\" \" -f2'")
    assert "status=sent" in log and relay.handler.attempts == [("PLAIN", True)]


@pytest.mark.parametrize("body, why", [
    ("echo 'gpg: decryption failed: No secret key' >&2\nexit 2\n",
     "failed with exit status 2: gpg: decryption failed: No secret key"),
    ("exit 0\n", "printed no password"),
    ("sleep 30 & sleep 30\n", "timed out after 1s"),
])
def test_password_command_failure_defers_with_its_reason(send: Run, relay: SaslRelay,
                                                         tmp_path: Path, body: str,
                                                         why: str) -> None:
    cmd = _script(tmp_path / "pw", body)
    started = time.monotonic()
    send(relayhost=relay.hop, smtp_sasl_username=USER, smtp_sasl_password_command=cmd,
         smtp_sasl_command_timeout="1s")
    assert time.monotonic() - started < 20  # the hang was cut short, children and all
    ((status, reason),) = send.reasons()
    assert status.startswith("4.7.") and why in reason and "smtp_sasl_password_command" in reason
    assert relay.handler.attempts == [] and relay.handler.commands == []


def test_the_password_is_nowhere_even_in_a_bounce(send: Run, certs: Certs,
                                                  tmp_path: Path) -> None:
    r = SaslRelay(SaslHandler(USER, "the-server-wants-another"), certs.server_context())
    try:
        cmd = _script(tmp_path / "pw", f"printf '%s\\n' '{PASSWORD}'\n")
        log = send(relayhost=r.hop, smtp_sasl_username=USER, smtp_sasl_password_command=cmd,
                   maximal_queue_lifetime=0)
    finally:
        r.stop()
    assert "SASL authentication failed" in log and "returned to sender" in log, log
    assert any(b"Undelivered Mail Returned to Sender" in f for f in send.files())
    send.nowhere(PASSWORD)


# -- OAuth2 ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("mechanism", ["xoauth2", "oauthbearer"])
def test_oauth2_token_longer_than_a_line(send: Run, relay: SaslRelay, tmp_path: Path,
                                         mechanism: str) -> None:
    out = json.dumps({"access_token": TOKEN, "expires_in": 3599, "token_type": "Bearer"})
    cmd = _script(tmp_path / "tok", f"echo '{out}'\n")
    log = send(relayhost=relay.hop, smtp_sasl_username=USER,
               smtp_sasl_oauth2_token_command=cmd, smtp_sasl_mechanism_filter=mechanism)
    assert "status=sent" in log, log
    assert relay.handler.attempts == [(mechanism.upper(), True)]
    assert len(relay.handler.messages) == 1
    send.nowhere(TOKEN)


@pytest.mark.parametrize("mechanism, answer", [("xoauth2", b""), ("oauthbearer", b"\x01")])
def test_error_challenge_gets_the_empty_response_and_defers_with_the_status(
        send: Run, relay: SaslRelay, tmp_path: Path, mechanism: str, answer: bytes) -> None:
    cmd = _script(tmp_path / "tok", f"echo {WRONG_TOKEN}\n")
    log = send(relayhost=relay.hop, smtp_sasl_username=USER,
               smtp_sasl_oauth2_token_command=cmd, smtp_sasl_mechanism_filter=mechanism)
    assert relay.handler.attempts == [(mechanism.upper(), False)]
    assert relay.handler.after_error == [answer] and relay.handler.commands == []
    ((status, reason),) = send.reasons()
    assert status == "4.7.8" and "535 5.7.8" in reason
    assert f"status={ERROR_CHALLENGE['status']}" in reason
    assert "status=deferred" in log
    send.nowhere(WRONG_TOKEN)


def test_default_mechanisms_with_a_token_prefer_xoauth2(send: Run, relay: SaslRelay,
                                                        tmp_path: Path) -> None:
    cmd = _script(tmp_path / "tok", f"echo {TOKEN}\n")
    assert "status=sent" in send(relayhost=relay.hop, smtp_sasl_username=USER,
                                 smtp_sasl_oauth2_token_command=cmd)
    assert relay.handler.attempts == [("XOAUTH2", True)]


@pytest.mark.parametrize("body, why", [
    ("echo one\necho two\n", "printed 2 lines"),
    ("echo '{\"token_type\": \"Bearer\"}'\n", "without an access_token"),
    ("true\n", "printed no token"),
])
def test_bad_token_output_defers_clearly(send: Run, relay: SaslRelay, tmp_path: Path,
                                         body: str, why: str) -> None:
    cmd = _script(tmp_path / "tok", body)
    send(relayhost=relay.hop, smtp_sasl_username=USER, smtp_sasl_oauth2_token_command=cmd)
    ((status, reason),) = send.reasons()
    assert status.startswith("4.7.") and why in reason, reason
    assert relay.handler.attempts == []


def test_mechanism_filter_excluding_what_the_server_offers_defers(send: Run, relay: SaslRelay,
                                                                  tmp_path: Path) -> None:
    send(relayhost=relay.hop, smtp_sasl_username=USER, smtp_sasl_password=PASSWORD,
         smtp_sasl_mechanism_filter="cram-md5")
    ((status, reason),) = send.reasons()
    assert status == "4.7.0" and "no AUTH mechanism we may use" in reason


def test_token_is_kept_for_its_expires_in(tmp_path: Path) -> None:
    count = tmp_path / "count"
    kept = _script(tmp_path / "kept", f'echo x >> {count}\necho \'{{"access_token": "t1", '
                   '"expires_in": 3600}\'\n')
    assert secret.token(kept) == secret.token(kept) == "t1"
    assert count.read_text() == "x\n"
    secret.forget_token(kept)  # refused by a server: asked again
    assert secret.token(kept) == "t1" and count.read_text() == "x\nx\n"
    short = _script(tmp_path / "short", f'echo y >> {count}\necho \'{{"access_token": "t2", '
                    '"expires_in": 30}\'\n')  # shorter than the margin: never kept
    assert secret.token(short) == secret.token(short) == "t2"
    plain = _script(tmp_path / "plain", f"echo z >> {count}\necho t3\n")
    assert secret.token(plain) == secret.token(plain) == "t3"
    assert count.read_text() == "x\nx\ny\ny\nz\nz\n"


def test_command_syntax_errors() -> None:
    with pytest.raises(secret.SecretError, match="cannot split"):
        secret.password("pass show 'unbalanced")
    with pytest.raises(secret.SecretError, match="cannot run /nonexistent/pw"):
        secret.password("/nonexistent/pw")
    with pytest.raises(secret.SecretError, match="is empty"):
        secret.password("  ")


def test_unsplittable_command_is_not_echoed() -> None:
    # a password_maps {command} entry is as secret as the map's value: never in a reason
    with pytest.raises(secret.SecretError) as e:
        secret.password("sh -c 'echo hunter2")
    assert "hunter2" not in str(e.value) and "cannot split" in str(e.value)


# -- per next hop: smtp_sasl_password_maps ----------------------------------------------------

def test_map_entries_with_a_command_or_a_token_command(send: Run, certs: Certs,
                                                       tmp_path: Path) -> None:
    pw_relay = SaslRelay(SaslHandler(USER, PASSWORD), certs.server_context())
    tok_relay = SaslRelay(SaslHandler(USER, token=TOKEN), certs.server_context())
    try:
        pw = _script(tmp_path / "pw", f"echo '{PASSWORD}'\n")
        tok = _script(tmp_path / "tok", f"echo {TOKEN}\n")
        maps = tmp_path / "sasl"
        maps.write_text(f"{pw_relay.hop} {USER}:{{command}}{pw} --quiet\n"
                        f"{tok_relay.hop} {USER}:{{oauth2}}{tok}\n")
        maps.chmod(0o600)
        transport = tmp_path / "transport"
        transport.write_text(f"far.test smtp:{tok_relay.hop}\n")
        send(relayhost=pw_relay.hop, smtp_sasl_password_maps=f"texthash:{maps}")
        send(relayhost=pw_relay.hop, smtp_sasl_password_maps=f"texthash:{maps}",
             transport_maps=f"texthash:{transport}")
    finally:
        pw_relay.stop()
        tok_relay.stop()
    assert pw_relay.handler.attempts == [("PLAIN", True)]
    assert tok_relay.handler.attempts == [("XOAUTH2", True)]
    send.nowhere(PASSWORD, TOKEN)


def test_map_entry_with_an_unknown_scheme_defers_without_the_value(
        send: Run, relay: SaslRelay, tmp_path: Path) -> None:
    maps = tmp_path / "sasl"
    maps.write_text(f"{relay.hop} {USER}:{{vault}}Secret-in-map\n")
    send(relayhost=relay.hop, smtp_sasl_password_maps=f"texthash:{maps}")
    ((status, reason),) = send.reasons()
    assert "unknown {scheme}" in reason and "Secret-in-map" not in reason + send.stderr


# -- TLS -------------------------------------------------------------------------------------------

def test_wrappermode_is_tls_on_connect_on_any_port(send: Run, certs: Certs) -> None:
    r = SaslRelay(SaslHandler(USER, PASSWORD), certs.server_context(), implicit=True)
    try:
        log = send(relayhost=r.hop, smtp_tls_wrappermode=True,
                   smtp_tls_security_level="verify", smtp_tls_CAfile=str(certs.ca_file),
                   smtp_sasl_username=USER, smtp_sasl_password=PASSWORD)
    finally:
        r.stop()
    assert "status=sent" in log and "Verified TLS" in log, log
    assert r.handler.attempts == [("PLAIN", True)]
    assert [m[3] for m in r.handler.messages] == [True]


def test_verify_trusts_a_ca_directory(send: Run, certs: Certs, relay: SaslRelay,
                                      tmp_path: Path) -> None:
    capath = tmp_path / "cas"
    capath.mkdir()
    pem = certs.ca_file.read_bytes()
    # the name c_rehash gives it: the subject hash, from openssl
    h = subprocess.run(["openssl", "x509", "-noout", "-subject_hash"], input=pem,
                       capture_output=True, check=True).stdout.decode().strip()
    (capath / f"{h}.0").write_bytes(pem)
    log = send(relayhost=relay.hop, smtp_tls_security_level="verify",
               smtp_tls_CApath=str(capath))
    assert "status=sent" in log and "Verified TLS" in log, log


def _client_cert(certs: Certs, tmp_path: Path, key_mode: int = 0o600) -> tuple[str, str]:
    client = certs.ca.issue_cert("client.test")
    cert, key = tmp_path / "client.pem", tmp_path / "client.key"
    cert.write_bytes(b"".join(b.bytes() for b in client.cert_chain_pems))
    client.private_key_pem.write_to_path(str(key))
    key.chmod(key_mode)
    return str(cert), str(key)


@pytest.fixture
def cert_relay(certs: Certs) -> Iterator[SaslRelay]:
    """A relay that requires a client certificate from its CA."""
    ctx = certs.server_context()
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cafile=str(certs.ca_file))
    r = SaslRelay(SaslHandler(USER), ctx)
    yield r
    r.stop()


def test_client_certificate(send: Run, certs: Certs, cert_relay: SaslRelay,
                            tmp_path: Path) -> None:
    send(relayhost=cert_relay.hop)
    ((status, reason),) = send.reasons()  # no certificate: the server ends the handshake
    assert status.startswith("4.") and cert_relay.handler.messages == []
    cert, key = _client_cert(certs, tmp_path)
    log = send(relayhost=cert_relay.hop, smtp_tls_cert_file=cert, smtp_tls_key_file=key)
    assert "status=sent" in log and cert_relay.handler.messages, log


def test_client_key_readable_by_others_is_refused(send: Run, certs: Certs,
                                                  cert_relay: SaslRelay,
                                                  tmp_path: Path) -> None:
    cert, key = _client_cert(certs, tmp_path, 0o644)
    send(relayhost=cert_relay.hop, smtp_tls_cert_file=cert, smtp_tls_key_file=key)
    ((status, reason),) = send.reasons()
    assert status == "4.7.5" and key in reason and "mode 0600" in reason
    assert cert_relay.handler.messages == []


def _fingerprint(certs: Certs) -> str:
    der = ssl.PEM_cert_to_DER_cert(certs.cert.cert_chain_pems[0].bytes().decode())
    digest = hashlib.sha256(der).hexdigest().upper()
    return ":".join(digest[i:i + 2] for i in range(0, len(digest), 2))


def _key_fingerprint(certs: Certs) -> str:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    cert = x509.load_pem_x509_certificate(certs.cert.cert_chain_pems[0].bytes())
    spki = cert.public_key().public_bytes(serialization.Encoding.DER,
                                          serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(spki).hexdigest()


@pytest.mark.parametrize("which", ["certificate", "public key"])
def test_right_fingerprint_delivers(send: Run, certs: Certs, relay: SaslRelay,
                                    which: str) -> None:
    pin = _fingerprint(certs).lower() if which == "certificate" else _key_fingerprint(certs)
    log = send(relayhost=relay.hop, smtp_tls_security_level="fingerprint",
               smtp_tls_fingerprint_cert_match=["00" * 32, pin],
               smtp_sasl_username=USER, smtp_sasl_password=PASSWORD)
    assert "status=sent" in log and "Verified TLS" in log, log
    assert relay.handler.attempts == [("PLAIN", True)]


def test_wrong_fingerprint_defers_and_sends_nothing(send: Run, relay: SaslRelay) -> None:
    log = send(relayhost=relay.hop, smtp_tls_security_level="fingerprint",
               smtp_tls_fingerprint_cert_match="AB:" * 31 + "AB",
               smtp_sasl_username=USER, smtp_sasl_password=PASSWORD)
    ((status, reason),) = send.reasons()
    assert status == "4.7.5" and "fingerprint" in reason and "status=deferred" in log
    assert relay.handler.attempts == [] and relay.handler.commands == []
    send.nowhere(PASSWORD)


def test_credentials_need_tls(send: Run, tmp_path: Path) -> None:
    r = SaslRelay(SaslHandler(USER, PASSWORD))  # no TLS at all
    try:
        cmd = _script(tmp_path / "pw", f"echo '{PASSWORD}'\n")
        send(relayhost=r.hop, smtp_tls_security_level="may", smtp_sasl_username=USER,
             smtp_sasl_password_command=cmd)
    finally:
        r.stop()
    ((status, reason),) = send.reasons()
    assert "offers no STARTTLS" in reason and "smtp_sasl_allow_plaintext" in reason
    assert r.handler.attempts == [] and r.handler.commands == []


@pytest.mark.parametrize("values, why", [
    ({"smtp_tls_fingerprint_digest": "md5"}, "only sha256 is supported"),
    ({"smtp_tls_fingerprint_cert_match": "AB:CD"}, "not a SHA-256 fingerprint"),
])
def test_bad_fingerprint_settings_defer_naming_the_key(send: Run, relay: SaslRelay,
                                                       values: dict, why: str) -> None:
    send(relayhost=relay.hop, smtp_tls_security_level="fingerprint", **values)
    ((status, reason),) = send.reasons()
    assert status.startswith("4.") and why in reason and relay.handler.commands == []


def test_bad_timeout_is_a_config_error(config_values: dict) -> None:
    with pytest.raises(ConfigError, match="smtp_sasl_command_timeout"):
        Config({**config_values, "smtp_sasl_command_timeout": "soon"})


def test_readme_provider_examples_are_valid(config_values: dict) -> None:
    """The README's provider section: its TOML is a valid configuration and its table lines
    give the credentials they claim."""
    import re
    import tomllib

    from pymailtools.qmgr.dispatch import map_credentials
    from pymailtools.smtp.policy import Policy

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    part = readme.split("## Sending through Gmail / Microsoft 365 / any provider", 1)[1]
    part = part.split("\n## ", 1)[0]
    blocks = re.findall(r"```toml\n(.*?)```", part, re.S)
    assert len(blocks) == 2
    for block in blocks:
        policy = Policy.from_config(Config({**config_values, **tomllib.loads(block)}))
        assert policy.level == "verify" and (policy.token_command or policy.password_command)
    (table,) = re.findall(r"```text\n(.*?)```", part, re.S)
    fields = [map_credentials(line.split(None, 1)[1]) for line in table.splitlines()
              if line and not line.startswith("#")]
    assert [sorted(f) for f in fields] == [["token_command", "username"]] * 2 + [
        ["password_command", "username"]]
    assert fields[0]["token_command"] == "pymailtools-oauth2 token --account gmail"


def test_the_oauth2_client_secret_command_is_run_by_the_same_runner() -> None:
    from pymailtools.errors import EX_CONFIG
    from pymailtools.smtp.oauth2 import OAuthError, client_secret

    assert client_secret("sh -c 'echo s3cret; echo more'") == "s3cret"
    with pytest.raises(OAuthError, match="exit status 3: vault is sealed") as e:
        client_secret("sh -c 'echo vault is sealed >&2; exit 3'")
    assert e.value.exit_code == EX_CONFIG


def test_expired_token_is_refreshed_by_pymailtools_oauth2_and_the_mail_goes(
        send: Run, certs: Certs, tmp_path: Path) -> None:
    """The real token helper as the token command: its stored access token has expired, so
    it refreshes it at the (loopback) OAuth server, and the relay takes the new one."""
    from tests.support.oauth import CLIENT_ID, OAuthServer

    store = tmp_path / "work.json"
    with OAuthServer(tmp_path) as server:
        p = subprocess.run(
            [script("pymailtools-oauth2"), "authorize", "--account", "work", "--provider",
             "custom", "--client-id", CLIENT_ID, "--device-endpoint", f"{server.url}/device",
             "--token-endpoint", f"{server.url}/token", "--scope", "https://mail.test/",
             "--ca-file", str(server.ca_file), "--store", str(store)],
            capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
        assert p.returncode == 0, p.stderr
        saved = json.loads(store.read_text())
        assert saved["access_token"] == "access-1"
        saved["expires_at"] = time.time() - 10
        store.write_text(json.dumps(saved))
        store.chmod(0o600)
        r = SaslRelay(SaslHandler(USER, token="access-2"), certs.server_context())
        try:
            log = send(relayhost=r.hop, smtp_sasl_username=USER,
                       smtp_sasl_mechanism_filter="oauthbearer",
                       smtp_sasl_oauth2_token_command=f"{script('pymailtools-oauth2')} token "
                                                      f"--account work --store {store} --json")
        finally:
            r.stop()
        assert server.paths()[-1] == "/token" and server.requests[-1][2]["grant_type"] == \
            "refresh_token"
    assert "status=sent" in log, log
    assert r.handler.attempts == [("OAUTHBEARER", True)]
    send.nowhere("access-2", "refresh-")

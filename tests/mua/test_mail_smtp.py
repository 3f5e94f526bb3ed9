"""mail -t HOST / -S mta=: verified TLS, STARTTLS levels, implicit TLS and AUTH, against aiosmtpd
on loopback with trustme certificates, through the queue's SMTP client and its policy."""

import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme
from aiosmtpd.smtp import SMTP, Envelope, Session

from tests.conftest import write_toml
from tests.support.mail import mail_env, run_mail
from tests.support.net import free_port
from tests.support.smtp import Authenticator, Handler, Server

PASSWORD = "Pw-4e5!x y"  # noqa: S105 - a test credential; a space and a bang on purpose


class TLSHandler(Handler):
    """Records whether each MAIL command came over TLS."""

    def __init__(self) -> None:
        super().__init__("mx")
        self.encrypted: list[bool] = []

    async def handle_MAIL(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, mail_options: list[str]) -> str:
        self.encrypted.append(session.ssl is not None)
        return await super().handle_MAIL(server, session, envelope, address, mail_options)


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA(organization_name="mail test CA")


def context(ca: trustme.CA, *names: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert(*names).configure_cert(ctx)
    return ctx


@pytest.fixture
def ca_file(ca: trustme.CA, tmp_path: Path) -> str:
    path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return str(path)


@pytest.fixture
def other_ca_file(tmp_path: Path) -> str:
    path = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(path))
    return str(path)


@pytest.fixture
def env(config_file: Path, tmp_path: Path) -> dict[str, str]:
    (tmp_path / "home").mkdir()
    return mail_env(config_file, tmp_path / "home")


@pytest.fixture
def servers() -> Iterator[list[Server]]:
    started: list[Server] = []
    yield started
    for s in started:
        s.stop()


def start(servers: list[Server], **kwargs: Any) -> tuple[Server, TLSHandler, int]:
    port = free_port()
    handler = TLSHandler()
    server = Server("127.0.0.1", port, handler, **kwargs)
    servers.append(server)
    return server, handler, port


def send(env: dict[str, str], *args: str) -> Any:
    return run_mail(env, *args, "-s", "tls test", "rcpt@example.test", input=b"body\n")


def one_line_error(stderr: bytes) -> str:
    lines = stderr.decode().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mail: "), stderr
    assert "Traceback" not in lines[0]
    return lines[0]


# --- certificate verification ------------------------------------------------------------------

@pytest.mark.parametrize("how", ["variables", "config"])
def test_verification_on_and_the_right_ca_delivers(env: dict[str, str], servers: list,
                                                   ca: trustme.CA, ca_file: str,
                                                   config_values: dict, tmp_path: Path,
                                                   how: str) -> None:
    _, handler, port = start(servers, tls_context=context(ca, "127.0.0.1"))
    if how == "variables":
        r = send(env, "-t", f"127.0.0.1:{port}", "-S", "tls-verify=strict",
                 "-S", f"tls-ca-file={ca_file}")
    else:
        conf = write_toml(tmp_path / "verify.toml", {
            **config_values, "smtp_tls_security_level": "verify", "smtp_tls_CAfile": ca_file})
        r = send(dict(env, PYMAILTOOLS_CONFIG=str(conf)), "-t", f"127.0.0.1:{port}")
    assert r.returncode == 0, r.stderr
    assert handler.encrypted == [True] and len(handler.messages) == 1
    assert handler.messages[0].rcpts == ["rcpt@example.test"]


@pytest.mark.parametrize("wrong", ["ca", "hostname"])
def test_verification_on_and_a_wrong_certificate_is_refused(
        env: dict[str, str], servers: list, ca: trustme.CA, ca_file: str,
        other_ca_file: str, wrong: str) -> None:
    if wrong == "ca":
        _, handler, port = start(servers, tls_context=context(ca, "127.0.0.1"))
        trusted = other_ca_file
    else:
        _, handler, port = start(servers, tls_context=context(ca, "mx.other.test"))
        trusted = ca_file
    r = send(env, "-t", f"127.0.0.1:{port}", "-S", "tls-verify=strict",
             "-S", f"tls-ca-file={trusted}")
    assert r.returncode == 69, r.stderr
    line = one_line_error(r.stderr)
    assert "certificate" in line.lower() and f"127.0.0.1]:{port}" in line
    assert handler.messages == [] and not any(c.startswith("MAIL") for c in handler.commands)


def test_without_verification_a_self_signed_server_still_gets_mail(
        env: dict[str, str], servers: list, ca: trustme.CA) -> None:
    """The configuration's default level (may): STARTTLS, certificate not checked."""
    _, handler, port = start(servers, tls_context=context(ca, "mx.other.test"))
    r = send(env, "-t", f"127.0.0.1:{port}")
    assert r.returncode == 0, r.stderr
    assert handler.encrypted == [True] and len(handler.messages) == 1


def test_tls_verify_ignore_overrides_a_verify_level(
        env: dict[str, str], servers: list, ca: trustme.CA, config_values: dict,
        tmp_path: Path, other_ca_file: str) -> None:
    _, handler, port = start(servers, tls_context=context(ca, "127.0.0.1"))
    conf = write_toml(tmp_path / "verify.toml", {
        **config_values, "smtp_tls_security_level": "verify", "smtp_tls_CAfile": other_ca_file})
    r = send(dict(env, PYMAILTOOLS_CONFIG=str(conf)), "-S", f"smtp=127.0.0.1:{port}",
             "-S", "ssl-verify=ignore")
    assert r.returncode == 0, r.stderr
    assert handler.encrypted == [True] and len(handler.messages) == 1


# --- STARTTLS levels and implicit TLS ----------------------------------------------------------

def test_smtp_use_starttls_refuses_a_server_without_it(env: dict[str, str],
                                                       servers: list) -> None:
    _, handler, port = start(servers)
    r = send(env, "-t", f"127.0.0.1:{port}", "-S", "smtp-use-starttls")
    assert r.returncode == 69, r.stderr
    assert "TLS is required" in one_line_error(r.stderr)
    assert handler.messages == []


@pytest.mark.parametrize("scheme", ["smtps", "submissions"])
def test_implicit_tls_url_verified(env: dict[str, str], servers: list, ca: trustme.CA,
                                   ca_file: str, other_ca_file: str, scheme: str) -> None:
    _, handler, port = start(servers, ssl_context=context(ca, "127.0.0.1"))
    r = send(env, "-S", f"mta={scheme}://127.0.0.1:{port}", "-S", "tls-verify=strict",
             "-S", f"tls-ca-file={ca_file}")
    assert r.returncode == 0, r.stderr  # a plaintext greeting wait would have timed out
    assert len(handler.messages) == 1
    r = send(env, "-S", f"mta={scheme}://127.0.0.1:{port}", "-S", "tls-verify=strict",
             "-S", f"tls-ca-file={other_ca_file}")
    assert r.returncode == 69, r.stderr
    one_line_error(r.stderr)
    assert len(handler.messages) == 1


# --- AUTH ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
def test_auth_after_starttls_sends_the_right_credentials(
        env: dict[str, str], servers: list, ca: trustme.CA, ca_file: str,
        mechanism: str) -> None:
    auth = Authenticator("me@example.test", PASSWORD)
    other = "LOGIN" if mechanism == "PLAIN" else "PLAIN"
    _, handler, port = start(servers, tls_context=context(ca, "127.0.0.1"), authenticator=auth,
                             auth_require_tls=True, auth_exclude_mechanism=[other])
    r = send(env, "-v", "-t", f"127.0.0.1:{port}", "-S", "smtp-use-starttls",
             "-S", "tls-verify=strict", "-S", f"tls-ca-file={ca_file}",
             "-S", "smtp-auth-user=me@example.test", "-S", f"smtp-auth-password={PASSWORD}")
    assert r.returncode == 0, r.stderr
    assert auth.attempts == [(mechanism, True)]
    assert handler.encrypted == [True] and len(handler.messages) == 1
    assert PASSWORD.encode() not in r.stdout + r.stderr


def test_auth_credentials_from_the_url(env: dict[str, str], servers: list,
                                       ca: trustme.CA, ca_file: str) -> None:
    auth = Authenticator("me@example.test", PASSWORD)
    _, handler, port = start(servers, tls_context=context(ca, "127.0.0.1"), authenticator=auth,
                             auth_require_tls=True)
    url = f"smtp://me%40example.test:{PASSWORD.replace(' ', '%20')}@127.0.0.1:{port}"
    r = send(env, "-S", f"mta={url}", "-S", "smtp-use-starttls", "-S", f"tls-ca-file={ca_file}")
    assert r.returncode == 0, r.stderr
    assert auth.attempts == [("PLAIN", True)] and len(handler.messages) == 1


def test_credentials_go_only_to_a_verified_server_by_default(
        env: dict[str, str], servers: list, ca: trustme.CA) -> None:
    """As s-nail, whose tls-verify defaults to strict: with a password and no tls-verify, a
    certificate that does not verify ends the session before AUTH."""
    auth = Authenticator("me", PASSWORD)
    _, handler, port = start(servers, tls_context=context(ca, "127.0.0.1"), authenticator=auth,
                             auth_require_tls=True)
    r = send(env, "-t", f"127.0.0.1:{port}", "-S", "smtp-auth-user=me",
             "-S", f"smtp-auth-password={PASSWORD}")
    assert r.returncode == 69, r.stderr
    assert "certificate" in one_line_error(r.stderr).lower()
    assert auth.attempts == [] and handler.messages == []
    assert PASSWORD.encode() not in r.stdout + r.stderr


def test_wrong_password_is_one_line_and_never_shown(env: dict[str, str], servers: list,
                                                    ca: trustme.CA, ca_file: str) -> None:
    auth = Authenticator("me", "right")
    _, handler, port = start(servers, tls_context=context(ca, "127.0.0.1"), authenticator=auth,
                             auth_require_tls=True)
    r = send(env, "-t", f"127.0.0.1:{port}", "-S", "smtp-auth-user=me",
             "-S", f"smtp-auth-password={PASSWORD}", "-S", f"tls-ca-file={ca_file}")
    assert r.returncode == 69, r.stderr
    assert "authentication failed" in one_line_error(r.stderr)
    assert PASSWORD.encode() not in r.stdout + r.stderr
    assert auth.attempts == [("PLAIN", False)] and handler.messages == []


def test_credentials_never_go_over_plaintext(env: dict[str, str], servers: list) -> None:
    auth = Authenticator("me", PASSWORD)
    _, handler, port = start(servers, authenticator=auth, auth_require_tls=False)
    r = send(env, "-t", f"127.0.0.1:{port}", "-S", "smtp-auth-user=me",
             "-S", f"smtp-auth-password={PASSWORD}", "-S", "tls-verify=ignore")
    assert r.returncode == 69, r.stderr
    loud, _, error = r.stderr.partition(b"\n")
    assert loud.startswith(b"mail: WARNING: tls-verify=ignore: ") and b"NOT checked" in loud
    assert "unencrypted" in one_line_error(error)
    assert auth.attempts == [] and handler.messages == []


# --- bad settings: usage errors before any input -----------------------------------------------

@pytest.mark.parametrize("args, text", [
    (["-t", "127.0.0.1:2525", "-S", "tls-verify=sometimes"], "tls-verify"),
    (["-t", "127.0.0.1:2525", "-S", "smtp-auth-user=me"], "smtp-auth-password"),
    (["-S", "smtp=pop3://127.0.0.1"], "unsupported"),
    (["-S", "smtp=127.0.0.1:99999"], "port"),
    (["-S", "smtp=me:Pw-secret@127.0.0.1"], "credentials go in a URL"),
])
def test_bad_smtp_settings_are_usage_errors(env: dict[str, str], args: list[str],
                                            text: str) -> None:
    r = run_mail(env, *args, "-s", "x", "u@x.test", input=b"x\n")
    assert r.returncode == 64, r.stderr
    assert text in one_line_error(r.stderr)
    assert b"Pw-secret" not in r.stderr


def test_a_missing_ca_file_is_one_line_not_a_traceback(env: dict[str, str], servers: list,
                                                       ca: trustme.CA, tmp_path: Path) -> None:
    _, handler, port = start(servers, tls_context=context(ca, "127.0.0.1"))
    r = send(env, "-S", f"mta=smtps://127.0.0.1:{port}", "-S", "tls-verify=strict",
             "-S", f"tls-ca-file={tmp_path / 'nonexistent.pem'}")
    assert r.returncode == 69, r.stderr
    assert "cannot load the CA file" in one_line_error(r.stderr)
    assert handler.messages == []


def test_a_password_in_a_bad_url_is_not_echoed(env: dict[str, str]) -> None:
    r = run_mail(env, "-S", f"mta=smtps://me:{PASSWORD}@bad host", "-s", "x", "u@x.test",
                 input=b"x\n")
    assert r.returncode == 64, r.stderr
    assert PASSWORD.encode() not in r.stderr and b"me:***@" in r.stderr


def test_site_relay_credentials_go_to_the_relayhost_only(
        env: dict[str, str], servers: list, ca: trustme.CA, config_values: dict,
        tmp_path: Path) -> None:
    """The configuration's smtp_sasl_* credentials are the relayhost's: `mail -t` to the
    relayhost uses them, to any other server the user names it never offers them."""
    auth = Authenticator("site@example.test", PASSWORD)
    _, relay_handler, relay_port = start(servers, tls_context=context(ca, "127.0.0.1"),
                                         authenticator=auth, auth_require_tls=True)
    other_auth = Authenticator("site@example.test", PASSWORD)
    _, other_handler, other_port = start(servers, tls_context=context(ca, "127.0.0.1"),
                                         authenticator=other_auth, auth_require_tls=True)
    conf = write_toml(tmp_path / "relay.toml", {
        **config_values, "relayhost": f"[127.0.0.1]:{relay_port}",
        "smtp_sasl_username": "site@example.test", "smtp_sasl_password": PASSWORD})
    site = dict(env, PYMAILTOOLS_CONFIG=str(conf))
    r = send(site, "-t", f"127.0.0.1:{relay_port}")
    assert r.returncode == 0, r.stderr
    assert auth.attempts == [("PLAIN", True)] and len(relay_handler.messages) == 1
    r = send(site, "-t", f"127.0.0.1:{other_port}")
    assert r.returncode == 0, r.stderr
    assert other_auth.attempts == [] and len(other_handler.messages) == 1
    assert not any(c.upper().startswith("AUTH") for c in other_handler.commands)

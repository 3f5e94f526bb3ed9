"""The SMTP client: wire encoding, STARTTLS policies with trustme certificates, AUTH, and the
password's absence from everything we write. Servers are aiosmtpd and the fault server."""

import os
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from pymailtools.config import Config
from pymailtools.smtp.client import check_address, encode_data
from tests.support.dns import TestDNS
from tests.support.net import free_port
from tests.support.queue import entries, queue, run, states
from tests.support.smtp import GREETING, Authenticator, FaultServer, Server, delivered

from .conftest import script, write_toml

PASSWORD = "s3cr3t-Pa55-4711"
HOSTS = ("127.0.0.5", "127.0.0.6", "127.0.0.7", "127.0.0.10")


# -- encoding ----------------------------------------------------------------------------------

def test_dot_stuffing_comes_after_line_end_normalisation() -> None:
    # A bare LF before ".\r\n" must not become an end of data at the next hop.
    assert encode_data(b"a\n.\r\nMAIL FROM:<x>\r\n") == b"a\r\n..\r\nMAIL FROM:<x>\r\n.\r\n"
    assert encode_data(b".first\n..second\nlast") == b"..first\r\n...second\r\nlast\r\n.\r\n"
    assert encode_data(b"cr\ronly\r\n") == b"cr\r\nonly\r\n.\r\n"
    assert encode_data(b"") == b".\r\n"


def test_long_lines_are_folded_at_998() -> None:
    out = encode_data(b"h: " + b"x" * 3000 + b"\n")
    lines = out.split(b"\r\n")
    assert all(len(ln) <= 998 for ln in lines)
    assert lines[1].startswith(b" ") and lines[-2] == b"."
    assert b"".join(lines[:4]).replace(b" ", b"") == b"h:" + b"x" * 3000


@pytest.mark.parametrize("addr", ['"q\r\nRSET"@b.test', "a@b.test>, <c@d.test", "a\x00@b",
                                  "a b@c.test", "a@b.test> SIZE=1"])
def test_unsafe_addresses_are_refused(addr: str) -> None:
    with pytest.raises(ValueError):
        check_address(addr, "recipient")


def test_quoted_local_part_with_space_is_kept() -> None:
    assert check_address('"a b"@c.test', "recipient") == b'"a b"@c.test'


# -- TLS ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def server_tls(ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("mx.tls.test", "smarthost.test", "127.0.0.7").configure_cert(ctx)
    return ctx


@pytest.fixture
def port() -> int:
    return free_port(HOSTS)


@pytest.fixture
def servers() -> Iterator[list]:
    started: list = []
    yield started
    for s in started:
        s.stop()


@pytest.fixture
def base(config_values: dict[str, object], dns_server: TestDNS, port: int,
         servers: list) -> dict[str, object]:
    servers.append(Server("127.0.0.10", port))  # the senders' MX, for bounces
    return {**config_values, "dns_nameservers": [dns_server.nameserver], "dns_timeout": 3,
            "smtp_port": port, "relayhost": "", "smtp_helo_timeout": 10,
            "smtp_starttls_timeout": 10, "smtp_data_done_timeout": 10}


class TLSSeen:
    """Wraps a handler's MAIL hook to record whether each transaction was encrypted."""

    def __init__(self, server: Server) -> None:
        self.encrypted: list[bool] = []
        handler = server.handler
        original = handler.handle_MAIL

        async def handle_MAIL(srv, session, envelope, address, options):  # type: ignore
            self.encrypted.append(session.ssl is not None)
            return await original(srv, session, envelope, address, options)

        handler.handle_MAIL = handle_MAIL  # type: ignore[method-assign]


def test_verify_accepts_the_right_ca(base: dict, port: int, servers: list, ca: trustme.CA,
                                     server_tls: ssl.SSLContext, tmp_path: Path) -> None:
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    mx = Server("127.0.0.5", port, tls_context=server_tls)
    servers.append(mx)
    seen = TLSSeen(mx)
    cfg = Config({**base, "smtp_tls_security_level": "verify",
                  "smtp_tls_CAfile": str(ca_file)})
    qid = queue(cfg, "bob@tls.test")
    stats = run(cfg)
    assert stats.delivered == 1 and states(cfg, qid) == {}
    assert seen.encrypted == [True] and len(mx.messages) == 1


def test_verify_refuses_a_wrong_ca(base: dict, port: int, servers: list,
                                   server_tls: ssl.SSLContext, tmp_path: Path) -> None:
    other = tmp_path / "other.pem"
    trustme.CA().cert_pem.write_to_path(str(other))
    mx = Server("127.0.0.5", port, tls_context=server_tls)
    servers.append(mx)
    cfg = Config({**base, "smtp_tls_security_level": "verify", "smtp_tls_CAfile": str(other)})
    qid = queue(cfg, "bob@tls.test")
    assert run(cfg).deferred == 1
    assert states(cfg, qid) == {"bob@tls.test": "deferred"}
    ((_, env),) = entries(cfg)
    r = env.recipients[0]
    assert r.status == "4.7.5" and "certificate" in r.reason.lower()
    assert mx.messages == [] and not any(c.startswith("MAIL") for c in mx.handler.commands)


def test_may_uses_tls_without_verifying(base: dict, port: int, servers: list,
                                        server_tls: ssl.SSLContext) -> None:
    mx = Server("127.0.0.5", port, tls_context=server_tls)
    servers.append(mx)
    seen = TLSSeen(mx)
    cfg = Config(base)  # default level: may, no CA file: the cert is untrusted
    queue(cfg, "bob@tls.test")
    assert run(cfg).delivered == 1 and seen.encrypted == [True]


def test_encrypt_without_starttls_offered_defers(base: dict, port: int, servers: list) -> None:
    mx = Server("127.0.0.5", port)
    servers.append(mx)
    cfg = Config({**base, "smtp_tls_security_level": "encrypt"})
    qid = queue(cfg, "bob@tls.test")
    assert run(cfg).deferred == 1 and states(cfg, qid) == {"bob@tls.test": "deferred"}
    ((_, env),) = entries(cfg)
    assert env.recipients[0].status == "4.7.4" and mx.messages == []


STARTTLS_BROKEN = [("send", b"220 fault.test ESMTP\r\n"), ("expect", b"EHLO"),
                   ("send", b"250-fault.test\r\n250 STARTTLS\r\n"), ("expect", b"STARTTLS"),
                   ("send", b"220 go ahead\r\n"), ("garbage", b"this is not TLS\r\n" * 20)]


def test_starttls_failure_with_may_retries_in_plaintext(base: dict, port: int,
                                                        servers: list) -> None:
    f = FaultServer(STARTTLS_BROKEN, delivered(), host="127.0.0.6", port=port)
    servers.append(f)
    cfg = Config(base)
    qid = queue(cfg, "bob@fault.test")
    assert run(cfg).delivered == 1 and states(cfg, qid) == {}
    assert f.connections == 2 and b"STARTTLS" not in f.received[1]


def test_starttls_failure_with_encrypt_defers(base: dict, port: int, servers: list) -> None:
    f = FaultServer(STARTTLS_BROKEN, delivered(), host="127.0.0.6", port=port)
    servers.append(f)
    cfg = Config({**base, "smtp_tls_security_level": "encrypt"})
    qid = queue(cfg, "bob@fault.test")
    assert run(cfg).deferred == 1 and states(cfg, qid) == {"bob@fault.test": "deferred"}
    assert f.connections == 1
    ((_, env),) = entries(cfg)
    assert env.recipients[0].status == "4.7.5"


def test_injected_reply_after_starttls_220_is_discarded(base: dict, port: int, servers: list,
                                                        server_tls: ssl.SSLContext) -> None:
    """A plaintext '250' riding with the 220 must not be read as the TLS EHLO reply."""
    script_ = [("send", b"220 fault.test ESMTP\r\n"), ("expect", b"EHLO"),
               ("send", b"250-fault.test\r\n250 STARTTLS\r\n"), ("expect", b"STARTTLS"),
               ("send", b"220 go ahead\r\n250 injected\r\n"), ("tls", server_tls),
               ("expect", b"EHLO"), ("send", b"250 fault.test\r\n"), ("expect", b"MAIL"),
               ("send", b"250 ok\r\n"), ("expect", b"RCPT"), ("send", b"250 ok\r\n"),
               ("expect", b"DATA"), ("send", b"354 go\r\n"), ("read_until", b"\r\n.\r\n"),
               ("send", b"250 ok\r\n")]
    f = FaultServer(script_, host="127.0.0.6", port=port)
    servers.append(f)
    cfg = Config(base)
    queue(cfg, "bob@fault.test")
    assert run(cfg).delivered == 1
    assert f.errors == []


# -- AUTH --------------------------------------------------------------------------------------

@pytest.fixture
def auth_server(port: int, servers: list, server_tls: ssl.SSLContext) -> Iterator[
        tuple[Server, Authenticator]]:
    auth = Authenticator("me", PASSWORD)
    s = Server("127.0.0.7", port, tls_context=server_tls, authenticator=auth,
               auth_require_tls=True)
    servers.append(s)
    yield s, auth


def _password_nowhere(root: Path, *outputs: bytes) -> None:
    for out in outputs:
        assert PASSWORD.encode() not in out
    for p in root.rglob("*"):
        if p.is_file():
            assert PASSWORD.encode() not in p.read_bytes(), p


def test_auth_plain_through_relayhost_and_the_password_stays_secret(
        base: dict, port: int, auth_server: tuple[Server, Authenticator], tmp_path: Path,
        ca: trustme.CA) -> None:
    server, auth = auth_server
    pw = tmp_path / "password"
    pw.write_text(PASSWORD + "\n")
    pw.chmod(0o600)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    values = {**base, "relayhost": f"[smarthost.test]:{port}", "smtp_sasl_username": "me",
              "smtp_sasl_password_file": str(pw), "smtp_tls_security_level": "verify",
              "smtp_tls_CAfile": str(ca_file)}
    conf = tmp_path / "auth.toml"
    write_toml(conf, values)
    env = dict(os.environ, PYMAILTOOLS_CONFIG=str(conf), PYMAILTOOLS_DELIVERY_MODE="queue")
    p = subprocess.run([script("sendmail"), "-f", "alice@sender.test", "bob@elsewhere.test"],
                       input=b"Subject: auth\n\nbody\n", env=env, capture_output=True,
                       timeout=60)
    assert p.returncode == 0, p.stderr
    p = subprocess.run([script("sendmail"), "-v", "-q"], env=env, capture_output=True,
                       timeout=60)
    assert p.returncode == 0, p.stderr
    assert b"status=sent" in p.stderr and b"Verified TLS" in p.stderr
    assert auth.attempts == [("PLAIN", True)] and len(server.messages) == 1
    _password_nowhere(Path(str(base["queue_directory"])), p.stdout, p.stderr)



def test_wrong_password_defers_and_is_not_logged(
        base: dict, port: int, capfd: pytest.CaptureFixture,
        auth_server: tuple[Server, Authenticator]) -> None:
    server, auth = auth_server
    cfg = Config({**base, "relayhost": f"[127.0.0.7]:{port}", "smtp_sasl_username": "me",
                  "smtp_sasl_password": "wrong-" + PASSWORD[::-1]})
    qid = queue(cfg, "bob@elsewhere.test")
    from pymailtools.qmgr.runner import Runner

    stats = Runner(cfg, verbose=True).run()
    assert stats.deferred == 1 and states(cfg, qid) == {"bob@elsewhere.test": "deferred"}
    assert auth.attempts == [("PLAIN", False)] and server.messages == []
    ((_, env),) = entries(cfg)
    assert env.recipients[0].status == "4.7.8" and "535" in env.recipients[0].reason
    out, err = capfd.readouterr()
    assert PASSWORD[::-1] not in out + err and "status=deferred" in err


def test_no_credentials_over_plaintext(base: dict, port: int, servers: list) -> None:
    auth = Authenticator("me", PASSWORD)
    s = Server("127.0.0.7", port, authenticator=auth, auth_require_tls=False)
    servers.append(s)
    cfg = Config({**base, "relayhost": f"[127.0.0.7]:{port}", "smtp_sasl_username": "me",
                  "smtp_sasl_password": PASSWORD})
    qid = queue(cfg, "bob@elsewhere.test")
    assert run(cfg).deferred == 1 and states(cfg, qid) == {"bob@elsewhere.test": "deferred"}
    assert auth.attempts == [] and s.messages == []
    ((_, env),) = entries(cfg)
    assert "smtp_sasl_allow_plaintext" in env.recipients[0].reason
    # Allowed explicitly: it authenticates and delivers.
    allowed = Config({**base, "relayhost": f"[127.0.0.7]:{port}", "smtp_sasl_username": "me",
                      "smtp_sasl_password": PASSWORD, "smtp_sasl_allow_plaintext": True})
    assert run(allowed, force=True).delivered == 1 and auth.attempts == [("PLAIN", True)]


def test_password_file_readable_by_others_is_refused(base: dict, port: int, tmp_path: Path,
                                                     auth_server: tuple) -> None:
    pw = tmp_path / "password"
    pw.write_text(PASSWORD)
    pw.chmod(0o644)
    cfg = Config({**base, "relayhost": f"[127.0.0.7]:{port}", "smtp_sasl_username": "me",
                  "smtp_sasl_password_file": str(pw)})
    queue(cfg, "bob@elsewhere.test")
    assert run(cfg).deferred == 1
    ((_, env),) = entries(cfg)
    assert "mode 0600" in env.recipients[0].reason and auth_server[1].attempts == []


def test_greeting_and_ehlo_use_myhostname(base: dict, port: int, servers: list) -> None:
    f = FaultServer(GREETING + [("close", None)], host="127.0.0.6", port=port)
    servers.append(f)
    cfg = Config(base)
    queue(cfg, "bob@fault.test")
    run(cfg)
    assert f.received[0].startswith(b"EHLO host.example.test\r\n")

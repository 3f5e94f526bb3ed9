"""DKIM signing end to end: sendmail queues, the queue runner signs (after smtp_generic_maps)
and sends to an aiosmtpd relay; dkimpy's verifier checks what arrived against the public key
that the test suite's dnsmasq serves as a TXT record. Through a real Postfix relay too; a key
that is too weak or readable by others defers the mail with the reason."""

import base64
import os
import pwd
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import dkim
import dns.exception
import dns.resolver
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from tests.conftest import Sendmail, need_root, need_tool, write_toml
from tests.support.dns import TestDNS, start_dns
from tests.support.net import free_port, wait_for
from tests.support.smtp import Certs, Server

DOMAIN = "example.test"
PEM = serialization.Encoding.PEM
NOENC = serialization.NoEncryption()


class Keys:
    """Private keys (PEM) and the TXT records of their public halves, by selector."""

    def __init__(self) -> None:
        self.pem: dict[str, bytes] = {}
        self.txt: dict[str, str] = {}
        for sel, bits in (("rsa", 2048), ("weak", 1024)):
            k = rsa.generate_private_key(65537, bits)
            self.pem[sel] = k.private_bytes(PEM, serialization.PrivateFormat.PKCS8, NOENC)
            der = k.public_key().public_bytes(serialization.Encoding.DER,
                                              serialization.PublicFormat.SubjectPublicKeyInfo)
            self.txt[sel] = "v=DKIM1; k=rsa; p=" + base64.b64encode(der).decode()
        e = ed25519.Ed25519PrivateKey.generate()
        self.pem["ed"] = e.private_bytes(PEM, serialization.PrivateFormat.PKCS8, NOENC)
        raw = e.public_key().public_bytes(serialization.Encoding.Raw,
                                          serialization.PublicFormat.Raw)
        self.txt["ed"] = "v=DKIM1; k=ed25519; p=" + base64.b64encode(raw).decode()

    def zone(self) -> str:
        """dnsmasq txt-record lines; a record longer than 255 octets as several strings."""
        lines = []
        for sel, text in self.txt.items():
            parts = ",".join(f'"{text[i:i + 200]}"' for i in range(0, len(text), 200))
            lines.append(f"txt-record={sel}._domainkey.{DOMAIN},{parts}\n")
        return "".join(lines)


@pytest.fixture(scope="module")
def keys() -> Keys:
    return Keys()


@pytest.fixture(scope="module")
def dkim_dns(keys: Keys) -> Iterator[TestDNS]:
    yield from start_dns(keys.zone())


def dnsfunc(server: TestDNS) -> Callable[..., bytes | None]:
    """dkimpy's TXT lookup, asking the test dnsmasq only."""
    res = dns.resolver.Resolver(configure=False)
    res.nameservers = ["127.0.0.1"]
    res.port = server.port

    def get_txt(name: bytes, timeout: float = 5) -> bytes | None:
        try:
            answer = res.resolve(name.decode().rstrip("."), "TXT", lifetime=timeout)
        except dns.exception.DNSException:
            return None
        return b"".join(b"".join(r.strings) for r in answer)

    return get_txt


def key_file(tmp_path: Path, keys: Keys, sel: str, mode: int = 0o600) -> Path:
    path = tmp_path / f"{sel}.key"
    path.write_bytes(keys.pem[sel])
    path.chmod(mode)
    return path


def sendmail_for(tmp_path: Path, config_values: dict[str, object], port: int, sel: str,
                 key: Path) -> Sendmail:
    values = {**config_values, "relayhost": f"[127.0.0.1]:{port}",
              "smtp_tls_security_level": "none", "myorigin": "host.localdomain",
              "mydestination": ["host.localdomain", "localhost"],
              "smtp_generic_maps": "inline:{ @host.localdomain=@example.test }",
              "dkim_domains": [DOMAIN, "other.test"], "dkim_selector": sel,
              "dkim_private_key_file": str(key)}
    path = write_toml(tmp_path / "dkim.toml", values)
    return Sendmail(path, Path(str(config_values["queue_directory"])))


# From: is a local name that smtp_generic_maps turns into example.test, a listed domain: only
# a signature made after rewriting verifies. The body's dot lines show that the signature
# covers the message, not its dot-stuffed DATA form.
MESSAGE = (b"From: Backup <backup@host.localdomain>\nTo: admin@remote.test\n"
           b"Subject: nightly backup\nMessage-ID: <1@host.localdomain>\n"
           b"Date: Sun, 06 Dec 2026 11:00:00 +0000\nX-Mailer: cron\n\n"
           b".hidden\n..two dots\nline\n.\nend\n")


@pytest.mark.parametrize("sel", ["rsa", "ed"])
def test_signed_after_rewriting_and_verified(tmp_path: Path, config_values: dict[str, object],
                                            keys: Keys, dkim_dns: TestDNS, sel: str) -> None:
    port = free_port()
    relay = Server("127.0.0.1", port)
    try:
        sendmail = sendmail_for(tmp_path, config_values, port, sel, key_file(tmp_path, keys, sel))
        p = sendmail("-i", "-f", "backup@host.localdomain", "admin@remote.test", input=MESSAGE)
        assert p.returncode == 0, p.stderr
        p = sendmail("-v", "-q")
        assert p.returncode == 0, p.stderr
        (m,) = relay.messages
    finally:
        relay.stop()
    line = next(x for x in p.stderr.decode().splitlines() if "to=<admin@remote.test>" in x)
    assert "status=sent" in line and line.endswith(", dkim=signed"), line
    assert m.content.startswith(b"DKIM-Signature: v=1; a=" + (
        b"rsa-sha256" if sel == "rsa" else b"ed25519-sha256") + b"; c=relaxed/relaxed; d=")
    assert b"\r\nFrom: Backup <backup@example.test>\r\n" in m.content
    assert m.content.endswith(b"\r\n\r\n.hidden\r\n..two dots\r\nline\r\n.\r\nend\r\n")
    d = dkim.DKIM(m.content)
    assert d.verify(dnsfunc=dnsfunc(dkim_dns)), d
    fields = d.signature_fields
    assert fields[b"d"] == b"example.test" and fields[b"s"] == sel.encode()
    # OpenDKIM's default set, those present only; X-Mailer is not in it
    assert b"".join(fields[b"h"].split()).split(b":") == [
        b"from", b"to", b"subject", b"message-id", b"date"]
    # a changed signed header breaks it: the verifier really checks
    tampered = m.content.replace(b"nightly backup", b"nightly backup!")
    assert not dkim.verify(tampered, dnsfunc=dnsfunc(dkim_dns))
    assert sendmail.entries() == []


def test_unlisted_domain_goes_unsigned(tmp_path: Path, config_values: dict[str, object],
                                       keys: Keys) -> None:
    port = free_port()
    relay = Server("127.0.0.1", port)
    try:
        sendmail = sendmail_for(tmp_path, config_values, port, "rsa",
                                key_file(tmp_path, keys, "rsa"))
        p = sendmail("-i", "-f", "x@elsewhere.test", "admin@remote.test",
                     input=b"From: x@elsewhere.test\nSubject: s\n\nb\n")
        assert p.returncode == 0, p.stderr
        p = sendmail("-v", "-q")
        (m,) = relay.messages
    finally:
        relay.stop()
    assert b"DKIM-Signature" not in m.content
    assert b"status=sent" in p.stderr and b"dkim=" not in p.stderr


@pytest.mark.parametrize(("sel", "mode", "why"), [
    ("rsa", 0o644, "mode 0644 gives group or others access (chmod 600)"),
    ("weak", 0o600, "RSA key of 1024 bits is too weak (at least 2048 needed)"),
])
def test_bad_key_defers_with_the_reason(tmp_path: Path, config_values: dict[str, object],
                                        keys: Keys, sel: str, mode: int, why: str) -> None:
    port = free_port()
    relay = Server("127.0.0.1", port)
    try:
        key = key_file(tmp_path, keys, sel, mode)
        sendmail = sendmail_for(tmp_path, config_values, port, sel, key)
        p = sendmail("-i", "-f", "backup@host.localdomain", "admin@remote.test", input=MESSAGE)
        assert p.returncode == 0, p.stderr
        p = sendmail("-v", "-q")
        assert p.returncode == 0, p.stderr
        assert relay.messages == []  # never sent unsigned
    finally:
        relay.stop()
    reason = f"DKIM signing key {key}: {why}"
    assert f"status=deferred ({reason})" in p.stderr.decode()
    ((state, env, _),) = sendmail.entries()
    assert state == "deferred" and env.recipients[0].reason == reason
    assert env.recipients[0].status == "4.3.5"
    listing = sendmail("-bp")
    assert reason in listing.stdout.decode()  # mailq shows why it waits


def test_key_owned_by_another_user(tmp_path: Path, config_values: dict[str, object],
                                   keys: Keys, system_user: pwd.struct_passwd) -> None:
    port = free_port()
    relay = Server("127.0.0.1", port)
    try:
        key = key_file(tmp_path, keys, "ed")
        os.chown(key, system_user.pw_uid, -1)
        sendmail = sendmail_for(tmp_path, config_values, port, "ed", key)
        assert sendmail("-i", "admin@remote.test", input=MESSAGE).returncode == 0
        p = sendmail("-v", "-q")
        assert relay.messages == []
    finally:
        relay.stop()
    assert (f"status=deferred (DKIM signing key {key}: owned by uid {system_user.pw_uid}, "
            "not by root)") in p.stderr.decode()


def test_relayed_unchanged_by_postfix(tmp_path: Path, config_values: dict[str, object],
                                      keys: Keys, dkim_dns: TestDNS) -> None:
    """Signed here, relayed by a real Postfix (which adds its Received: header), verified
    where it arrives."""
    need_tool("postfix", "postfix")
    need_root()
    from tests.support.postfix import postfix_instance

    final = free_port()
    inbox = Server("127.0.0.1", final)
    try:
        extra = (f"default_transport = smtp\nrelayhost = [127.0.0.1]:{final}\n"
                 "smtp_tls_security_level = none\n")
        with postfix_instance(Certs(tmp_path), extra) as pport:
            sendmail = sendmail_for(tmp_path, config_values, pport, "rsa",
                                    key_file(tmp_path, keys, "rsa"))
            p = sendmail("-i", "-f", "backup@host.localdomain", "admin@remote.test",
                         input=MESSAGE)
            assert p.returncode == 0, p.stderr
            p = sendmail("-v", "-q")
            assert b"dkim=signed" in p.stderr, p.stderr
            wait_for("the message relayed by Postfix", lambda: inbox.messages)
        (m,) = inbox.messages
    finally:
        inbox.stop()
    assert m.content.startswith(b"Received: from host.example.test"), m.content[:200]
    assert b"\r\nDKIM-Signature: v=1; a=rsa-sha256" in m.content
    assert dkim.verify(m.content, dnsfunc=dnsfunc(dkim_dns))


def test_incomplete_configuration_defers_everything_remote(
        tmp_path: Path, config_values: dict[str, object], keys: Keys) -> None:
    port = free_port()
    relay = Server("127.0.0.1", port)
    try:
        sendmail = sendmail_for(tmp_path, config_values, port, "", key_file(tmp_path, keys, "ed"))
        assert sendmail("-i", "admin@remote.test", input=MESSAGE).returncode == 0
        p = sendmail("-v", "-q")
        assert relay.messages == []
    finally:
        relay.stop()
    assert ("status=deferred (configuration error: dkim_domains is set: dkim_selector and "
            "dkim_private_key_file are needed too)") in p.stderr.decode()


def test_dknewkey_ed25519_seed_and_other_key_forms(tmp_path: Path, keys: Keys) -> None:
    """dkimpy's dknewkey writes an Ed25519 key as its base64 seed: accepted like PEM."""
    import nacl.encoding
    import nacl.signing

    from pymailtools.smtp.signing import parse_key

    seed = nacl.signing.SigningKey.generate().encode(encoder=nacl.encoding.Base64Encoder)
    assert parse_key(seed + b"\n").algorithm == b"ed25519-sha256"
    assert parse_key(keys.pem["ed"]).algorithm == b"ed25519-sha256"
    assert parse_key(keys.pem["rsa"]).algorithm == b"rsa-sha256"
    for bad, why in [(b"hello", "neither an RSA (PEM) nor an Ed25519 private key"),
                     (b"-----BEGIN ENCRYPTED PRIVATE KEY-----\nAAAA\n-----END ENCRYPTED "
                      b"PRIVATE KEY-----\n", "encrypted keys are not supported"),
                     (b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
                      "neither an RSA nor an Ed25519 private key")]:
        with pytest.raises(ValueError, match=re.escape(why)):
            parse_key(bad)

"""The SMTP client's shared pieces: the policy and its variants, the one host:port parser, the
one MX ordering, the one reply type."""

import dataclasses
from pathlib import Path

import pytest

from pymailtools.config import Config
from pymailtools.errors import ConfigError
from pymailtools.smtp import mx, nexthop
from pymailtools.smtp.policy import Policy
from pymailtools.smtp.reply import Reply


def test_policy_from_config_and_clone(config_values: dict) -> None:
    cfg = Config({**config_values, "smtp_tls_security_level": "encrypt",
                  "smtp_sasl_username": "me", "smtp_sasl_password": "s3cret",
                  "smtp_connect_timeout": 7})
    base = Policy.from_config(cfg)
    assert (base.level, base.username, base.timeouts.connect) == ("encrypt", "me", 7.0)
    assert base.helo_name == cfg.myhostname and not base.implicit_tls
    tls = base.clone(implicit_tls=True)
    assert tls.implicit_tls and not base.implicit_tls  # the original is unchanged
    assert tls.clone(implicit_tls=False) == base
    with pytest.raises(dataclasses.FrozenInstanceError):
        base.level = "none"  # type: ignore[misc]  # assigning is what this test checks
    with pytest.raises(TypeError):
        base.clone(no_such_setting=1)
    with pytest.raises(ValueError):
        base.clone(level="sometimes")
    assert "s3cret" not in repr(base) and "s3cret" not in str(tls)


def test_password_file_is_read_only_when_private(tmp_path: Path) -> None:
    pw = tmp_path / "pw"
    pw.write_text("from-file\nignored\n")
    pw.chmod(0o600)
    assert Policy(password_file=str(pw)).read_password() == "from-file"
    assert Policy(password="given", password_file=str(pw)).read_password() == "given"
    pw.chmod(0o640)
    with pytest.raises(ConfigError, match="0600"):
        Policy(password_file=str(pw)).read_password()


@pytest.mark.parametrize("text, kw, want", [
    ("mx.test", {}, ("mx.test", 25, False)),
    ("mx.test:587", {}, ("mx.test", 587, False)),
    ("[ipv6:2001:db8::1]:2525", {}, ("2001:db8::1", 2525, True)),
    ("[::1]", {}, ("::1", 25, True)),
    ("2001:db8::1", {}, ("2001:db8::1", 25, False)),  # bare IPv6: no port
    ("mx.test/587", {"slash": True}, ("mx.test", 587, False)),
    ("[::1]/2525", {"slash": True}, ("::1", 2525, True)),
    ("mx.test:submission", {"services": True}, ("mx.test", 587, False)),
])
def test_split_forms(text: str, kw: dict, want: tuple) -> None:
    assert tuple(nexthop.split(text, 25, **kw)) == want


@pytest.mark.parametrize("text, kw", [
    ("mx.test:", {}), ("mx.test:0", {}), ("mx.test:65536", {}), ("mx.test:smtp", {}),
    ("[::1", {}), ("[::1]x", {}), ("", {}), ("mx.test/25", {}),
    ("x:no-such-svc", {"services": True}),
])
def test_split_refuses(text: str, kw: dict) -> None:
    with pytest.raises(ValueError):
        host = nexthop.split(text, 25, **kw).host
        nexthop.check_host(host)


def test_dns_nameservers_use_the_same_parser(config_values: dict) -> None:
    cfg = Config({**config_values, "dns_nameservers": ["127.0.0.1:5353", "[::1]:53", "::1"]})
    r = mx.make_resolver(cfg)
    assert [(str(n.address), n.port) for n in r.nameservers] == [  # type: ignore[union-attr]
        ("127.0.0.1", 5353), ("::1", 53), ("::1", 53)]
    with pytest.raises(ConfigError, match="dns_nameservers"):
        mx.make_resolver(Config({**config_values, "dns_nameservers": ["ns.test"]}))


def test_mx_order() -> None:
    got = mx.order([(20, "B.test."), (10, "a.test."), (20, "c.test."), (5, "d.test")])
    assert got is not None
    assert got[:2] == [(5, "d.test"), (10, "a.test")]
    assert sorted(got[2:]) == [(20, "b.test"), (20, "c.test")]
    assert mx.order([(0, ".")]) is None  # null MX
    assert mx.order([(0, "."), (10, "a.test.")]) == [(10, "a.test")]


def test_reply_text_and_str() -> None:
    r = Reply(250, [b"250-mx.test hello", b"250-SIZE 100", b"250 8BITMIME"])
    assert r.ok and r.positive and r.text == "mx.test hello SIZE 100 8BITMIME"
    assert str(Reply(550, [b"550 5.1.1 no such user"])) == "550 5.1.1 no such user"
    assert str(Reply(354, [b"354"])) == "354" and not Reply(0, [b"junk"]).ok

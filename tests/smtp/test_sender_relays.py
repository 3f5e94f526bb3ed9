"""One box, several senders, several providers: sender_dependent_relayhost_maps picks each
sender's relay, smtp_sasl_password_maps (per sender with smtp_sender_dependent_authentication,
else per next hop) its credentials; two real aiosmtpd relays with AUTH over STARTTLS check who
logged in for which message."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult

from pymailtools.config import Config
from pymailtools.qmgr.runner import Runner
from tests.support.net import TIMEOUT, free_port
from tests.support.queue import entries, queue
from tests.support.smtp import Certs

PASSWORDS = {"one-user": "Pw1-one!secret", "two-user": "Pw2-two!secret",
             "carol-user": "Pw3-carol!secret", "hop-user": "Pw4-hop!secret"}


@dataclass
class Got:
    sender: str
    rcpts: list[str]
    login: str


@dataclass
class AuthSink:
    """Records each message with the user its session authenticated as ("" for none)."""

    messages: list[Got] = field(default_factory=list)
    peers: set[Any] = field(default_factory=set)  # one per connection

    @property
    def sessions(self) -> int:
        return len(self.peers)

    async def handle_EHLO(self, server: Any, session: Any, envelope: Any, hostname: str,
                          responses: list[str]) -> list[str]:
        self.peers.add(tuple(session.peer))
        session.host_name = hostname
        return responses

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        data = session.auth_data
        login = data.login.decode() if data is not None else ""
        self.messages.append(Got(envelope.mail_from, list(envelope.rcpt_tos), login))
        return "250 2.0.0 Ok: queued"


def _accounts(server: Any, session: Any, envelope: Any, mechanism: str,
              auth_data: Any) -> AuthResult:
    login = getattr(auth_data, "login", b"").decode()
    ok = PASSWORDS.get(login, None) == getattr(auth_data, "password", b"").decode()
    return AuthResult(success=ok, handled=False, auth_data=auth_data)


class Relay:
    def __init__(self, host: str, certs: Certs) -> None:
        self.host = host
        self.port = free_port((host,))
        self.sink = AuthSink()
        self.controller = Controller(
            self.sink, hostname=host, port=self.port, server_hostname="relay.test",
            tls_context=certs.server_context(), authenticator=_accounts,
            auth_require_tls=True, ready_timeout=TIMEOUT)
        self.controller.start()

    @property
    def hop(self) -> str:
        return f"[{self.host}]:{self.port}"


@pytest.fixture
def relays(certs: Certs) -> Iterator[tuple[Relay, Relay]]:
    one, two = Relay("127.0.0.1", certs), Relay("127.0.0.2", certs)
    yield one, two
    one.controller.stop()
    two.controller.stop()


def _table(path: Path, lines: list[str]) -> str:
    path.write_text("".join(line + "\n" for line in lines))
    path.chmod(0o600)
    return f"texthash:{path}"


def test_each_sender_goes_to_its_relay_as_its_own_user(
        tmp_path: Path, config_values: dict, relays: tuple[Relay, Relay],
        capsys: pytest.CaptureFixture[str]) -> None:
    one, two = relays
    cfg = Config({
        **config_values,
        "smtp_tls_security_level": "encrypt",
        "relayhost": one.hop,  # carol has no entry of her own: the default relayhost
        "sender_dependent_relayhost_maps": _table(tmp_path / "relays", [
            f"alice@one.test {one.hop}",
            f"@two.test {two.hop}",
        ]),
        "smtp_sender_dependent_authentication": True,
        "smtp_sasl_password_maps": _table(tmp_path / "sasl", [
            f"alice@one.test one-user:{PASSWORDS['one-user']}",
            f"@two.test two-user:{PASSWORDS['two-user']}",
            f"carol@three.test carol-user:{PASSWORDS['carol-user']}",
            # by next hop, for senders without an entry (dave)
            f"{one.hop} hop-user:{PASSWORDS['hop-user']}",
        ]),
        # the single account must lose to every map entry
        "smtp_sasl_username": "global-user", "smtp_sasl_password": "global-password",
    })
    queue(cfg, "x@dest.test", sender="alice@one.test")
    queue(cfg, "y@dest.test", sender="bob@two.test")
    queue(cfg, "z@dest.test", sender="carol@three.test")
    queue(cfg, "w@dest.test", sender="dave@four.test")
    stats = Runner(cfg, verbose=True).run()
    assert stats.delivered == 4, stats.results
    assert entries(cfg) == []
    got_one = sorted((m.sender, m.login, m.rcpts[0]) for m in one.sink.messages)
    got_two = sorted((m.sender, m.login, m.rcpts[0]) for m in two.sink.messages)
    assert got_one == [("alice@one.test", "one-user", "x@dest.test"),
                       ("carol@three.test", "carol-user", "z@dest.test"),
                       ("dave@four.test", "hop-user", "w@dest.test")]
    assert got_two == [("bob@two.test", "two-user", "y@dest.test")]
    # different credentials never share a session
    assert one.sink.sessions == 3 and two.sink.sessions == 1
    log = capsys.readouterr().err
    assert f"relay=127.0.0.1[127.0.0.1]:{one.port}" in log
    assert f"relay=127.0.0.2[127.0.0.2]:{two.port}" in log
    _no_secrets(log, tmp_path)


def test_sender_entry_needs_sender_dependent_authentication(
        tmp_path: Path, config_values: dict, relays: tuple[Relay, Relay]) -> None:
    """Without smtp_sender_dependent_authentication the sender entries are not looked at:
    the next hop's entry is used, as in Postfix."""
    one, _ = relays
    cfg = Config({
        **config_values,
        "smtp_tls_security_level": "encrypt",
        "relayhost": one.hop,
        "smtp_sasl_password_maps": _table(tmp_path / "sasl", [
            f"alice@one.test one-user:{PASSWORDS['one-user']}",
            f"{one.hop} hop-user:{PASSWORDS['hop-user']}",
        ]),
    })
    queue(cfg, "x@dest.test", sender="alice@one.test")
    assert Runner(cfg).run().delivered == 1
    assert [m.login for m in one.sink.messages] == ["hop-user"]


def test_wrong_map_password_defers_and_never_shows_it(
        tmp_path: Path, config_values: dict, relays: tuple[Relay, Relay],
        capsys: pytest.CaptureFixture[str]) -> None:
    one, _ = relays
    wrong = "Wr0ng-pw-never-shown"
    cfg = Config({
        **config_values,
        "smtp_tls_security_level": "encrypt",
        "relayhost": one.hop,
        "smtp_sasl_password_maps": _table(tmp_path / "sasl", [f"[{one.host}]:{one.port} "
                                                              f"one-user:{wrong}"]),
        "maximal_queue_lifetime": 0,  # deferred at once becomes a bounce: check it too
    })
    queue(cfg, "x@dest.test")
    stats = Runner(cfg, verbose=True).run()
    assert stats.delivered == 0 and stats.bounced == 1 and one.sink.messages == []
    log = capsys.readouterr().err
    assert "SASL authentication failed" in log
    texts = [p.read_text(errors="replace") for p in Path(cfg.queue_directory).rglob("*")
             if p.is_file()]
    # the notice to the sender (still queued: it goes the same way) tells why, without it
    assert any("Undelivered Mail Returned to Sender" in t for t in texts)
    for text in [log, *texts]:
        assert wrong not in text
        assert base64.b64encode(f"\0one-user\0{wrong}".encode()).decode() not in text


def test_malformed_map_entry_defers_without_the_value(
        tmp_path: Path, config_values: dict, relays: tuple[Relay, Relay],
        capsys: pytest.CaptureFixture[str]) -> None:
    one, _ = relays
    cfg = Config({
        **config_values,
        "relayhost": one.hop,
        "smtp_sasl_password_maps": _table(tmp_path / "sasl", [f"{one.hop} NoColonSecret"]),
    })
    qid = queue(cfg, "x@dest.test")
    stats = Runner(cfg, verbose=True).run()
    assert stats.deferred == 1 and one.sink.messages == []
    ((_, env),) = entries(cfg)
    assert env.id == qid
    reason = env.recipients[0].reason
    assert "smtp_sasl_password_maps" in reason and "user:password" in reason
    log = capsys.readouterr().err
    assert "NoColonSecret" not in log and "NoColonSecret" not in reason


def _no_secrets(log: str, tmp_path: Path) -> None:
    files = [p for p in tmp_path.rglob("*") if p.is_file() and p.name not in ("sasl",)]
    texts = [log] + [p.read_text(errors="replace") for p in files]
    for pw in [*PASSWORDS.values(), "global-password"]:
        for text in texts:
            assert pw not in text


def test_missing_password_table_defers_naming_it(tmp_path: Path, config_values: dict,
                                                 relays: tuple[Relay, Relay]) -> None:
    one, _ = relays
    cfg = Config({**config_values, "relayhost": one.hop,
                  "smtp_sasl_password_maps": f"hash:{tmp_path / 'nonexistent'}"})
    queue(cfg, "x@dest.test")
    assert Runner(cfg).run().deferred == 1 and one.sink.messages == []
    ((_, env),) = entries(cfg)
    reason = env.recipients[0].reason
    assert "smtp_sasl_password_maps" in reason and "nonexistent" in reason


def test_the_site_account_is_offered_to_the_relayhost_only(config_values: dict) -> None:
    """smtp_sasl_username/password/password_command/oauth2_token_command belong to the
    relayhost: a transport_maps or sender-dependent next hop, or an MX host, never gets them
    (only a map entry for it)."""
    from pymailtools.config import Config
    from pymailtools.log import Logger
    from pymailtools.qmgr.dispatch import Dispatcher
    from pymailtools.smtp.nexthop import parse

    cfg = Config({**config_values, "relayhost": "[127.0.0.1]:2525",
                  "smtp_sasl_username": "site", "smtp_sasl_password": "site-secret",
                  "smtp_sasl_password_command": "pass show site",
                  "smtp_sasl_oauth2_token_command": "site-token"})
    d = Dispatcher(cfg, Logger("sendmail", to_syslog=False, verbose=False))
    assert d.destination(parse("[127.0.0.1]:2525"), "a@b.test", "s@x.test").policy.username \
        == "site"
    for hop in (parse("[127.0.0.2]:2525"), parse("partner.example"), None):
        policy = d.destination(hop, "a@b.test", "s@x.test").policy
        assert (policy.username, policy.password, policy.password_file,
                policy.password_command, policy.token_command) == ("", "", "", "", "")

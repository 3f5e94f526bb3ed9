"""transport_maps: per domain, subdomain and address routes to an SMTP next hop, the local
transport, error (a bounce with the table's text), discard, and Postfix's empty fields; a real
aiosmtpd relay on loopback stands for the next hops."""

from __future__ import annotations

import pwd
from collections.abc import Iterator
from pathlib import Path

import pytest

from pymailtools.config import Config
from pymailtools.qmgr.runner import Runner
from pymailtools.qmgr.transport import DISCARD, ERROR, LOCAL, RETRY, SMTP, Route, Router
from pymailtools.smtp.nexthop import NextHop
from tests.support.net import free_port
from tests.support.queue import entries, queue
from tests.support.smtp import Server


@pytest.fixture
def relay() -> Iterator[Server]:
    s = Server("127.0.0.1", free_port())
    yield s
    s.stop()


def _cfg(config_values: dict, tmp_path: Path, lines: list[str], **more: object) -> Config:
    path = tmp_path / "transport"
    path.write_text("".join(line + "\n" for line in lines))
    return Config({**config_values, "transport_maps": f"texthash:{path}", **more})


def test_lookup_order_and_empty_fields(config_values: dict, tmp_path: Path) -> None:
    cfg = _cfg(config_values, tmp_path, [
        "user@special.test    smtp:[10.0.0.1]:2525",
        "special.test         relay:mx.special.test",
        ".sub.test            smtp:[10.0.0.2]",
        "keep.test            :",
        "hop.test             :[10.0.0.3]:26",
        "domain.test          smtp:",
        "bad.test             error:5.7.1 no mail here, please",
        "plain-error.test     error:go away",
        "later.test           retry:4.4.1 try again later",
        "void.test            discard:policy says no",
        "here.test            local:",
        "other.test           uucp:gateway",
        "mess.test            smtp:[broken",
        "host.example.test    smtp:[10.0.0.4]",
    ], relayhost="[10.9.9.9]:587")
    r = Router(cfg)
    relayhost = NextHop("10.9.9.9", 587, False, False)
    assert r.route("user@special.test", "") == Route(SMTP, NextHop("10.0.0.1", 2525, False,
                                                                   False))
    assert r.route("USER@Special.test", "") == Route(SMTP, NextHop("10.0.0.1", 2525,
                                                                   False, False))
    assert r.route("other@special.test", "") == Route(SMTP, NextHop("mx.special.test", 25,
                                                                    True, False))
    # .sub.test: subdomains only; sub.test itself keeps the default (relayhost)
    assert r.route("a@deep.er.sub.test", "") == Route(SMTP, NextHop("10.0.0.2", 25, False,
                                                                    False))
    assert r.route("a@sub.test", "") == Route(SMTP, relayhost)
    # ":" changes nothing; ":nexthop" only the next hop; "smtp:" the recipient domain
    assert r.route("a@keep.test", "") == Route(SMTP, relayhost)
    assert r.route("a@hop.test", "") == Route(SMTP, NextHop("10.0.0.3", 26, False, False))
    assert r.route("a@domain.test", "") == Route(SMTP, None)
    assert r.route("a@bad.test", "").status() == ("5.7.1", "no mail here, please")
    assert r.route("a@plain-error.test", "").status() == ("5.0.0", "go away")
    later = r.route("a@later.test", "")
    assert later.transport == RETRY and later.status() == ("4.4.1", "try again later")
    assert r.route("a@void.test", "") == Route(DISCARD, text="policy says no")
    assert r.route("a@here.test", "") == Route(LOCAL)
    unknown = r.route("a@other.test", "")
    assert unknown.transport == RETRY and "uucp" in unknown.text
    broken = r.route("a@mess.test", "")
    assert broken.transport == RETRY and "transport_maps" in broken.text
    # one of our own domains routed elsewhere; the others stay local
    assert r.route("root@host.example.test", "") == Route(SMTP, NextHop("10.0.0.4", 25, False,
                                                                        False))
    assert r.route("root@localhost", "") == Route(LOCAL)
    assert r.route("a@bad.test", "").transport == ERROR


def test_wildcard_and_regexp(config_values: dict, tmp_path: Path) -> None:
    rx = tmp_path / "transport.re"
    rx.write_text("/^(.*)@rx\\.test$/   smtp:[10.0.0.5]:2$1\n")
    star = tmp_path / "star"
    star.write_text("*  smtp:[10.0.0.6]\n")
    cfg = Config({**config_values, "transport_maps": f"regexp:{rx}, texthash:{star}"})
    r = Router(cfg)
    assert r.route("5@rx.test", "") == Route(SMTP, NextHop("10.0.0.5", 25, False, False))
    assert r.route("a@anywhere.test", "") == Route(SMTP, NextHop("10.0.0.6", 25, False, False))


def test_routes_over_a_real_relay(config_values: dict, tmp_path: Path, relay: Server,
                                  spool: Path, system_user: pwd.struct_passwd) -> None:
    hop = f"smtp:[127.0.0.1]:{relay.controller.port}"
    name = system_user.pw_name
    cfg = _cfg(config_values, tmp_path, [
        f"routed.test     {hop}",
        f".sub.test       {hop}",
        f"user@special.test {hop}",
        f"sender.test     {hop}",  # the bounce goes back to the sender this way
        "bad.test         error:5.7.1 mail for bad.test is not accepted here",
        "void.test        discard:",
        "here.test        local:",
    ])
    qid = queue(cfg, "a@routed.test", "b@x.sub.test", "user@special.test",
                "other@special.test", "c@bad.test", "d@void.test", f"{name}@here.test")
    stats = Runner(cfg).run()
    got = sorted(r for m in relay.messages for r in m.rcpts)
    assert "a@routed.test" in got and "b@x.sub.test" in got and "user@special.test" in got
    # other@special.test has no route of its own: MX lookup of special.test, which fails
    ((_, env),) = [(s, e) for s, e in entries(cfg) if e.id == qid]
    by = {r.address: r for r in env.recipients}
    assert by["other@special.test"].state == "deferred"
    assert by["c@bad.test"].state == "bounced"
    assert by["c@bad.test"].status == "5.7.1"
    assert by["c@bad.test"].reason == "mail for bad.test is not accepted here"
    assert by["d@void.test"].state == "sent"
    assert f"{name}@here.test" not in got and by[f"{name}@here.test"].state == "sent"
    assert b"Subject: remote" in (spool / name).read_bytes()
    assert stats.bounced == 1
    # the sender's notice went out through the relay, with the table's text
    (notice,) = [m for m in relay.messages if m.sender in ("", "<>")]
    assert notice.rcpts == ["alice@sender.test"]
    assert b"mail for bad.test is not accepted here" in notice.content
    assert all("d@void.test" not in m.rcpts for m in relay.messages)


def test_unreadable_table_defers_everything(config_values: dict, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    cfg = Config({**config_values, "transport_maps": f"hash:{tmp_path / 'missing'}"})
    qid = queue(cfg, "root@localhost", "a@remote.test")
    stats = Runner(cfg, verbose=True).run()
    assert stats.deferred == 2 and stats.delivered == 0
    ((_, env),) = entries(cfg)
    assert env.id == qid
    for r in env.recipients:
        assert r.state == "deferred" and "configuration error" in r.reason
        assert "missing" in r.reason
    err = capsys.readouterr().err
    assert "routing: transport_maps: " in err and "missing" in err


def test_sender_dependent_relayhost_order(config_values: dict, tmp_path: Path) -> None:
    relays = tmp_path / "relays"
    relays.write_text("alice@one.test [10.0.0.1]:587\n@one.test [10.0.0.2]\n"
                      "bob@two.test DUNNO\n@two.test [10.0.0.3]\n<> [10.0.0.4]\n"
                      "eve@bad.test [broken\n")
    transport = tmp_path / "transport"
    transport.write_text("direct.test smtp:\nkept.test :\n")
    cfg = Config({**config_values, "relayhost": "[10.9.9.9]",
                  "sender_dependent_relayhost_maps": f"texthash:{relays}",
                  "transport_maps": f"texthash:{transport}"})
    r = Router(cfg)

    def hop(sender: str, rcpt: str = "x@dest.test") -> NextHop | None:
        return r.route(rcpt, sender).hop

    assert hop("alice@one.test") == NextHop("10.0.0.1", 587, False, False)
    assert hop("Alice@One.test") == NextHop("10.0.0.1", 587, False, False)
    assert hop("carol@one.test") == NextHop("10.0.0.2", 25, False, False)
    assert hop("bob@two.test") == NextHop("10.9.9.9", 25, False, False)  # DUNNO: relayhost
    assert hop("dave@two.test") == NextHop("10.0.0.3", 25, False, False)
    assert hop("") == NextHop("10.0.0.4", 25, False, False)
    assert hop("zed@three.test") == NextHop("10.9.9.9", 25, False, False)
    # transport_maps wins: "smtp:" is the recipient domain, ":" keeps the sender's relay
    assert hop("alice@one.test", "x@direct.test") is None
    assert hop("alice@one.test", "x@kept.test") == NextHop("10.0.0.1", 587, False, False)
    # local mail stays local whoever sends it
    assert r.route("root@localhost", "alice@one.test") == Route(LOCAL)
    bad = r.route("x@dest.test", "eve@bad.test")
    assert bad.transport == RETRY and "sender_dependent_relayhost_maps" in bad.text


def test_bv_names_the_route_of_each_address(tmp_path: Path,
                                            config_values: dict[str, object]) -> None:
    """sendmail -bv says where the runner would send an address, without connecting."""
    from tests.conftest import Sendmail, write_toml

    conf = write_toml(tmp_path / "bv.toml", {
        **config_values, "relayhost": "[relay.example.test]:2525",
        "transport_maps": "inline:{ {bounce.test=error:5.7.1 we do not serve it}, "
                          "gone.test=discard:, direct.test=smtp:, "
                          "mx.test=smtp:[mx.example.test]:26, here.test=local: }"})
    sendmail = Sendmail(conf, Path(str(config_values["queue_directory"])))
    p = sendmail("-bv", "a@elsewhere.test", "b@direct.test", "c@mx.test", "d@gone.test")
    assert p.returncode == 0, p.stderr
    assert p.stdout.decode().splitlines() == [
        "a@elsewhere.test: remote: via [relay.example.test]:2525",
        "b@direct.test: remote: via the MX hosts of direct.test",
        "c@mx.test: remote: via [mx.example.test]:26",
        "d@gone.test: discarded"]
    p = sendmail("-bv", "e@bounce.test")
    assert p.returncode == 67
    assert p.stdout.decode() == "e@bounce.test: undeliverable: we do not serve it (5.7.1)\n"
    p = sendmail("-bv", "root@here.test")
    assert p.returncode == 0, p.stdout
    assert p.stdout.decode().startswith("root@here.test: ")
    assert "remote" not in p.stdout.decode()

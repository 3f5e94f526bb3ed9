"""relayhost: Postfix's syntax, and delivery through a relayhost with and without MX lookup."""

import socket
import ssl
from collections.abc import Iterator

import pytest
import trustme

from pymailtools.config import Config
from pymailtools.errors import ConfigError
from pymailtools.smtp.nexthop import NextHop, parse
from tests.support.dns import TestDNS
from tests.support.net import free_port
from tests.support.queue import entries, queue, run, states
from tests.support.smtp import Server


@pytest.mark.parametrize("text, hop", [
    ("smtp.isp.test", NextHop("smtp.isp.test", 25, True, False)),
    ("smtp.isp.test:587", NextHop("smtp.isp.test", 587, True, False)),
    ("[smtp.isp.test]", NextHop("smtp.isp.test", 25, False, False)),
    ("[smtp.isp.test]:587", NextHop("smtp.isp.test", 587, False, False)),
    ("[Smtp.ISP.test.]:465", NextHop("smtp.isp.test", 465, False, True)),
    ("[192.0.2.1]:2525", NextHop("192.0.2.1", 2525, False, False)),
    ("[ipv6:2001:db8::1]:587", NextHop("2001:db8::1", 587, False, False)),
    ("[2001:db8::1]", NextHop("2001:db8::1", 25, False, False)),
])
def test_postfix_syntax(text: str, hop: NextHop) -> None:
    assert parse(text) == hop


@pytest.mark.parametrize("text", ["[host", "host:", "host:0", "host:99999", "host:25x",
                                  "bad_label-.test", "-x.test", "a b.test", "[]", "2001:db8::1",
                                  "host.test:587:1", "[x.test]junk"])
def test_bad_syntax_is_a_config_error(text: str) -> None:
    with pytest.raises(ConfigError, match="relayhost"):
        parse(text)


def test_str_round_trips() -> None:
    assert str(parse("[a.test]:587")) == "[a.test]:587"
    assert str(parse("a.test")) == "a.test:25"


@pytest.fixture
def port() -> int:
    return free_port(("127.0.0.2", "127.0.0.7", "127.0.0.10"))


@pytest.fixture
def servers(port: int) -> Iterator[list]:
    started = [Server("127.0.0.10", port)]  # the senders' MX, for bounces
    yield started
    for s in started:
        s.stop()


def _cfg(config_values: dict, dns_server: TestDNS, port: int, relay: str) -> Config:
    return Config({**config_values, "dns_nameservers": [dns_server.nameserver],
                   "dns_timeout": 3, "smtp_port": port, "relayhost": relay})


@pytest.mark.parametrize("form", ["[smarthost.test]:{port}", "[127.0.0.7]:{port}",
                                  "relaymx.test:{port}", "smarthost.test"])
def test_everything_goes_to_the_relayhost(config_values: dict, dns_server: TestDNS,
                                          port: int, servers: list, form: str) -> None:
    relay = Server("127.0.0.7", port)
    mx1 = Server("127.0.0.2", port)  # good.test's MX: must not be used
    servers += [relay, mx1]
    cfg = _cfg(config_values, dns_server, port, form.format(port=port))
    qid = queue(cfg, "a@good.test", "b@aonly.test", "c@nx.test")
    assert run(cfg).delivered == 3 and states(cfg, qid) == {}
    assert mx1.messages == []
    # One destination: all three recipients in one transaction.
    (m,) = relay.messages
    assert sorted(m.rcpts) == ["a@good.test", "b@aonly.test", "c@nx.test"]


def test_unresolvable_relayhost_defers_never_bounces(config_values: dict, dns_server: TestDNS,
                                                     port: int, servers: list) -> None:
    cfg = _cfg(config_values, dns_server, port, "[nosuch.nx.test]:25")
    qid = queue(cfg, "a@good.test")
    assert run(cfg).deferred == 1 and states(cfg, qid) == {"a@good.test": "deferred"}
    ((_, env),) = entries(cfg)
    assert env.recipients[0].status.startswith("4.") and servers[0].messages == []


def test_bad_relayhost_defers_with_the_configuration_error(config_values: dict,
                                                           dns_server: TestDNS, port: int,
                                                           servers: list) -> None:
    cfg = _cfg(config_values, dns_server, port, "[broken")
    qid = queue(cfg, "a@good.test")
    assert run(cfg).deferred == 1 and states(cfg, qid) == {"a@good.test": "deferred"}
    ((_, env),) = entries(cfg)
    assert "relayhost" in env.recipients[0].reason


def test_port_465_is_implicit_tls(config_values: dict, dns_server: TestDNS, port: int,
                                  servers: list, tmp_path) -> None:
    try:
        with socket.socket() as s:
            # as the server will: a previous run's TIME_WAIT must not count as "in use"
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.7", 465))
    except OSError:
        pytest.skip("cannot bind 127.0.0.7:465 (not root, or in use)")
    ca = trustme.CA()
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("smarthost.test").configure_cert(ctx)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    relay = Server("127.0.0.7", 465, ssl_context=ctx)
    servers.append(relay)
    cfg = Config({**config_values, "dns_nameservers": [dns_server.nameserver],
                  "smtp_port": port, "relayhost": "[smarthost.test]:465",
                  "smtp_tls_security_level": "verify", "smtp_tls_CAfile": str(ca_file)})
    qid = queue(cfg, "a@good.test")
    assert run(cfg).delivered == 1 and states(cfg, qid) == {}
    assert len(relay.messages) == 1

"""The listener's shortcuts around aiosmtpd's per-connection and per-command costs give the
answers aiosmtpd itself gives."""

from __future__ import annotations

import asyncio
import inspect
import random
from pathlib import Path

import pytest
from aiosmtpd.smtp import SMTP

from pymailtools.config import Config
from pymailtools.log import Logger
from pymailtools.smtpd import Handler, Server, Settings

SAMPLES = [
    "", " ", "<>", "<> SIZE=10", "<a@b>", "<root@localhost>", "  <a@b>", "\t<a@b>\t",
    "<a@b> SIZE=100 BODY=8BITMIME", "<a@b>  NOTIFY=SUCCESS ORCPT=rfc822;a@b", "<a@b>(comment)",
    "<a@b> (comment) X=1", "<a@b>x", "< a@b >", "<a@ b>", '<"quoted local"@b>', "<a..b@c>",
    "<.a@b>", "<a.@b>", "<a@b..c>", "<a@.b>", "<a@b.>", "<@route:a@b>", "<a@[192.0.2.1]>",
    "<a@b", "a@b>", "a@b", "a@b SIZE=1", "<a b@c>", "<a@b@c>", "<ä@b>", "<a@bä>", "<a@>",
    "<@b>", "<a>", "\x0b<a@b>", "<a@b>\x0b", "<a@b>\u00a0X", "<!#$%&'*+-/=?^_`{|}~@x.y>",
    "<a(b)@c>", "<a@b> <c@d>", "<a@b>>", "<<a@b>>", "<a\\@b@c>", "<a@b>;", "<a@b>\t\tX=1",
    "<" + "x" * 64 + "@b>", "<" + "x" * 65 + "@b>",
]
ALPHABET = "ab.@<>() \t\"\\[]:;,!x1-_=ä\x0b"


def outcome(method, server: Server, arg: str) -> object:
    """What ``method`` answers, or the type of the exception it raises (the email package's
    parser fails on some garbage with AttributeError: ours must fail the same way)."""
    try:
        return method(server, arg)
    except Exception as e:
        return type(e)


@pytest.fixture
def server() -> Server:
    return Server.__new__(Server)  # _getaddr reads only class attributes


def test_getaddr_agrees_with_aiosmtpd_on_samples(server: Server) -> None:
    for arg in SAMPLES:
        assert outcome(Server._getaddr, server, arg) == outcome(SMTP._getaddr, server, arg), \
            repr(arg)


def test_getaddr_agrees_with_aiosmtpd_on_random_input(server: Server) -> None:
    rng = random.Random(5321)

    def text(most: int, alphabet: str = ALPHABET) -> str:
        return "".join(rng.choice(alphabet) for _ in range(rng.randrange(most)))

    for _ in range(20000):
        if rng.random() < 0.3:
            arg = text(14)
        else:  # shaped like <local@domain> rest, mostly within the short cut's reach
            atom = "abx1.-_=!" * 8 + ALPHABET
            arg = (text(3, " \t(") + "<" + text(6, atom) + "@" + text(6, atom) + ">"
                   + text(8, " X=1" * 4 + ALPHABET))
        assert outcome(Server._getaddr, server, arg) == outcome(SMTP._getaddr, server, arg), \
            repr(arg)


def test_getaddr_keeps_the_local_part_limit(server: Server) -> None:
    server.local_part_limit = 64
    for arg in ("<" + "x" * 64 + "@b>", "<" + "x" * 65 + "@b>"):
        assert Server._getaddr(server, arg) == SMTP._getaddr(server, arg)
    assert Server._getaddr(server, "<" + "x" * 65 + "@b>") == (None, None)


def test_aiosmtpd_still_finds_every_command_hook_and_mechanism(tmp_path: Path) -> None:
    cfg = Config({"queue_directory": str(tmp_path / "q"), "syslog": False})
    handler = Handler(Settings(cfg), Logger("smtpd", to_syslog=False, verbose=False))

    async def make() -> Server:
        return Server(handler, loop=asyncio.get_running_loop())

    server = asyncio.run(make())
    assert set(server._smtp_methods) == {n[5:] for n in object.__dir__(server)
                                         if n.startswith("smtp_")}
    assert set(server._handle_hooks) == {n[7:] for n in object.__dir__(handler)
                                         if n.startswith("handle_")}
    assert set(server._auth_methods) == {"LOGIN", "PLAIN"}
    assert server._ehlo_hook_ver == "new"
    assert list(inspect.signature(handler.handle_EHLO).parameters) == [
        "server", "session", "envelope", "hostname", "responses"]

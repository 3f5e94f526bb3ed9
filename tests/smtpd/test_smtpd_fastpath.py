"""The listener's shortcuts around aiosmtpd's per-connection and per-command costs give the
answers aiosmtpd itself gives."""

from __future__ import annotations

import asyncio
import collections
import inspect
import io
import random
import types
import weakref
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.smtp import SMTP

from pymailtools.config import Config
from pymailtools.log import Logger
from pymailtools.smtpd import data as smtpd_data
from pymailtools.smtpd.policy import Settings
from pymailtools.smtpd.protocol import Handler, Server, _Commands, _Counted

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


def _same_shape(a: object, b: object, fresh: Server, built: Server, path: str) -> None:
    """``a`` (an attribute of a fresh Server) matches ``b`` (of a built one): equal values,
    and bound methods of the same function on the matching object."""
    if isinstance(a, types.MethodType):
        assert isinstance(b, types.MethodType) and a.__func__ is b.__func__, path
        assert a.__self__ is (fresh if b.__self__ is built else b.__self__), path
    elif isinstance(a, _Counted):
        assert isinstance(b, _Counted) and a.name == b.name, path
        assert a.server is fresh and b.server is built, path
        _same_shape(a.method, b.method, fresh, built, path + ".method")
    elif isinstance(a, tuple) and hasattr(a, "_fields"):  # aiosmtpd's _AuthMechAttr
        assert type(a) is type(b), path
        for field, x, y in zip(a._fields, a, b, strict=True):
            _same_shape(x, y, fresh, built, f"{path}.{field}")
    elif isinstance(a, _Commands):
        assert isinstance(b, _Commands) and list(a) == list(b), path
        assert a.server is fresh and b.server is built, path
        for k in a:
            _same_shape(a[k], b[k], fresh, built, f"{path}[{k!r}]")
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), path
        for k in a:
            _same_shape(a[k], b[k], fresh, built, f"{path}[{k!r}]")
    elif isinstance(a, weakref.ref):
        assert type(a()) is type(b()), path
    elif isinstance(a, asyncio.Future | asyncio.StreamReader):
        assert type(a) is type(b), path
    else:
        assert a == b or a is b, path


def test_a_fresh_server_is_a_built_one(tmp_path: Path) -> None:
    """Server.fresh copies a template instead of running aiosmtpd's __init__: every attribute
    must come out as a built Server has it, none shared that one connection could change.
    This is what breaks first if aiosmtpd's or asyncio's protocol state changes shape."""
    cfg = Config({"queue_directory": str(tmp_path / "q"), "syslog": False})
    handler = Handler(Settings(cfg), Logger("smtpd", to_syslog=False, verbose=False))

    async def make() -> tuple[Server, Server, Server]:
        loop = asyncio.get_running_loop()
        return Server(handler, loop=loop), Server.fresh(handler, loop), Server.fresh(handler, loop)

    built, fresh, other = asyncio.run(make())
    assert handler.template is not None
    assert fresh.__dict__.keys() == built.__dict__.keys()
    for name, value in fresh.__dict__.items():
        _same_shape(value, built.__dict__[name], fresh, built, name)
    for name, value in fresh.__dict__.items():  # nothing one connection changes is shared
        if isinstance(value, list | set | dict | bytearray | collections.deque | weakref.ref
                      | asyncio.Future | asyncio.StreamReader):
            assert value is not other.__dict__[name] or name == "_handle_hooks", name
    handler.settings = Settings(cfg)  # SIGHUP: the next connection gets a new template

    async def again() -> Server:
        return Server.fresh(handler, asyncio.get_running_loop())

    asyncio.run(again())
    assert handler.template.settings is handler.settings


async def _aiosmtpd_data(reader: asyncio.StreamReader, size_limit: int,
                         line_limit: int) -> tuple[bytes, str]:
    """aiosmtpd 1.4's DATA loop (SMTP.smtp_DATA), as the reference for smtpd_data.read_data."""
    data: list[bytearray] = []
    num_bytes, fragments, state = 0, [], ""
    while True:
        try:
            line = await reader.readuntil(b"\r\n")
        except asyncio.LimitOverrunError as e:
            state = state or smtpd_data.TOO_LONG
            data *= 0
            line = await reader.read(e.consumed)
        if not fragments and line == b".\r\n":
            break
        num_bytes += len(line)
        if not state and size_limit and num_bytes > size_limit:
            state = smtpd_data.TOO_MUCH
            data *= 0
        fragments.append(line)
        if line.endswith(b"\r\n"):
            if not state:
                joined = b"".join(fragments)
                if len(joined) > line_limit:
                    state = smtpd_data.TOO_LONG
                    data *= 0
                else:
                    data.append(bytearray(joined))
            fragments = []
    if state:
        return b"", state
    for text in data:
        if text.startswith(b"."):
            del text[0]
    return b"".join(data), ""


def _stream(rng: random.Random) -> bytes:
    """A DATA stream: lines with dots, bare CRs and LFs, some long, the end marker, then
    perhaps the next commands; or an end marker hidden behind bare line ends."""
    pieces = [b"a", b"b c", b".", b"..", b"\r", b"\n", b"\r\n", b".\r\n", b"\n.\n", b"\r.\r",
              b"\n.\r\n", b"x" * rng.choice((5, 19, 30, 999, 1000, 1001, 1500))]
    body = b"".join(rng.choice(pieces) for _ in range(rng.randrange(0, 40)))
    end = rng.choice([b"\r\n.\r\n", b"\r\n.\r\n", b".\r\n"]) if body.endswith(b"\r\n") or \
        not body else b"\r\n.\r\n"
    after = rng.choice([b"", b"", b"QUIT\r\n", b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\n", b"."])
    return body + end + after


@pytest.mark.parametrize("seed", range(4))
def test_bulk_data_reading_gives_aiosmtpds_answers(seed: int) -> None:
    """smtpd_data.read_data against aiosmtpd's own loop on 2,500 random streams fed in random
    pieces: the same content (dots unstuffed), the same verdict, and the same bytes left for
    the next command. When a message is both too long and too much, either verdict will do."""
    rng = random.Random(seed)

    async def run(reader_fn: Any, stream: bytes, cuts: list[int], size: int,
                  width: int) -> tuple[bytes, str, bytes]:
        reader = asyncio.StreamReader(limit=width)
        task = asyncio.ensure_future(reader_fn(reader, size, width))
        last = 0
        for cut in [*cuts, len(stream)]:
            reader.feed_data(stream[last:cut])
            last = cut
            await asyncio.sleep(0)
        content, state = await task
        reader.feed_eof()
        return content, state, await reader.read()

    async def main() -> None:
        for _ in range(625):
            stream = _stream(rng)
            cuts = sorted(rng.sample(range(1, len(stream)), min(len(stream) - 1,
                                                                rng.randrange(0, 6))))
            size = rng.choice([0, 0, 40, 200, 1200])
            width = rng.choice([1001, 1001, 20, 64])
            want = await run(_aiosmtpd_data, stream, cuts, size, width)
            got = await run(smtpd_data.read_data, stream, cuts, size, width)
            if got != want and {got[1], want[1]} == {smtpd_data.TOO_LONG, smtpd_data.TOO_MUCH}:
                assert got[0] == want[0] == b"" and got[2] == want[2], stream
                continue
            assert got == want, (stream, cuts, size, width)

    asyncio.run(main())


def test_a_message_of_exactly_the_size_limit_is_kept_however_it_arrives() -> None:
    """The end marker's dot is no content: one that arrives alone must not tip a message of
    exactly the limit over it (and neither may its CR)."""
    body = b"x" * 38 + b"\r\n"  # 40 bytes: exactly the limit

    async def main(cut: int) -> tuple[bytes, str]:
        reader = asyncio.StreamReader(limit=1001)
        task = asyncio.ensure_future(smtpd_data.read_data(reader, 40, 1001))
        stream = body + b".\r\n"
        reader.feed_data(stream[:cut])
        await asyncio.sleep(0)
        reader.feed_data(stream[cut:])
        return await task

    for cut in range(1, len(body) + 3):
        assert asyncio.run(main(cut)) == (body, ""), cut


def test_queue_writes_leave_the_loop_thread_only_while_the_disk_is_slow(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """QueueWriter: real queue writes on the loop's thread; one slow write (a stand-in for a
    slow disk: a commit that sleeps) is not a slow disk, but once the average passes SLOW the
    next PROBE go to the thread pool, then one is tried on the loop's thread again."""
    import threading
    import time

    from pymailtools.queue import intake
    from pymailtools.queue.store import Queue
    from pymailtools.smtpd.protocol import QueueWriter
    from pymailtools.submit import submission as submit

    cfg = Config({"queue_directory": str(tmp_path / "q"), "syslog": False})
    queue = Queue(cfg.queue_directory)
    queue.ensure()
    delay: list[float] = [0.0]
    where: list[bool] = []

    def recorded(real: Any) -> Any:
        def call(*args: Any) -> Any:
            where.append(threading.current_thread() is threading.main_thread())
            time.sleep(delay[0])
            return real(*args)
        return call

    monkeypatch.setattr(submit, "submit", recorded(submit.submit))  # in a thread
    monkeypatch.setattr(intake, "commit_group", recorded(intake.commit_group))  # on the loop's
    writer = QueueWriter()
    writer.PROBE = 3

    def write(n: int, seconds: float) -> None:
        delay[0] = seconds

        async def go() -> None:
            for _ in range(n):
                opts = submit.Options(["root@localhost"], "a@b.test", fullname="")
                await writer.submit(cfg, io.BytesIO(b"Subject: x\n\nbody\n"), opts, queue)

        asyncio.run(go())

    write(2, 0.0)
    write(1, QueueWriter.SLOW * 2.5)  # one slow fsync: the average stays below SLOW
    write(1, QueueWriter.SLOW * 15)  # now it is above: the next three go to threads
    write(3, QueueWriter.SLOW * 15)
    write(2, 0.0)  # the probe is quick: back on the loop's thread
    assert where == [True, True, True, True, False, False, False, True, True]
    assert len(queue.ids("incoming")) == 9


def test_local_recipient_verdicts_are_reused_briefly(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A burst of RCPTs for one address costs one lookup (user, aliases, .forward); a change
    to the aliases shows once the verdict is older than VERDICT_SECONDS, and a new Settings
    (SIGHUP) starts afresh."""
    import time

    from pymailtools.errors import DeliveryError
    from pymailtools.smtpd import policy

    aliases = tmp_path / "aliases"
    aliases.write_text("postmaster: root\n")
    cfg = Config({"queue_directory": str(tmp_path / "q"), "syslog": False,
                  "alias_maps": [str(aliases)], "mydestination": ["localhost"]})
    monkeypatch.setattr(policy, "VERDICT_SECONDS", 0.5)
    settings = Settings(cfg)
    assert settings.local_verdict("postmaster@localhost") is None
    unknown = settings.local_verdict("sales@localhost")
    assert isinstance(unknown, DeliveryError) and unknown.status == "5.1.1"
    aliases.write_text("postmaster: root\nsales: root\n")
    assert settings.local_verdict("sales@localhost") is unknown  # the cached answer
    assert Settings(cfg).local_verdict("sales@localhost") is None  # a reload asks again
    time.sleep(0.6)
    assert settings.local_verdict("sales@localhost") is None  # and so does time


@pytest.mark.parametrize("size_limit", [0, 1000])  # kept, and refused as too much
def test_bytes_after_the_end_go_back_before_what_the_reader_still_holds(size_limit: int) -> None:
    """A message, its end and the next commands arriving in one piece larger than a read
    (smtpd_data.CHUNK): the commands come out of the reader next, in order, whatever part of
    them the reads took."""
    message = b"".join(b"line %05d\r\n" % i for i in range(7000))  # 77 KB
    commands = b"MAIL FROM:<b@x.test>\r\nDATA\r\n" + b"RSET\r\n" * 40000 + b".\r\nQUIT\r\n"

    async def main() -> tuple[bytes, str, bytes]:
        reader = asyncio.StreamReader(limit=1001)
        reader.feed_data(message + b".\r\n" + commands)
        content, problem = await smtpd_data.read_data(reader, size_limit, 1001)
        reader.feed_eof()
        return content, problem, await reader.read()

    content, problem, rest = asyncio.run(main())
    assert (content, problem) == ((message, "") if not size_limit else (b"", "too much"))
    assert rest == commands


def test_data_calls_progress_at_each_read() -> None:
    """The session's idle timer is moved by every read of a message, not only per command."""
    calls = []

    async def main() -> bytes:
        reader = asyncio.StreamReader(limit=1001)
        task = asyncio.ensure_future(smtpd_data.read_data(reader, 0, 1001,
                                                          lambda: calls.append(1)))
        for i in range(5):
            reader.feed_data(b"part %d\r\n" % i)
            await asyncio.sleep(0)
        reader.feed_data(b".\r\n")
        content, _ = await task
        return content

    assert asyncio.run(main()) == b"".join(b"part %d\r\n" % i for i in range(5))
    assert len(calls) == 6

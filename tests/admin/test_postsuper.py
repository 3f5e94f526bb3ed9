"""postsuper: Postfix's operations and texts, strict ids, the entry lock, and a live runner."""

import fcntl
import os
import pwd
import subprocess
import threading
import time
from pathlib import Path

import pytest

from pymailtools.queue import bulk
from pymailtools.queue.envelope import Envelope, Recipient
from pymailtools.queue.store import HOLD, INCOMING, Queue
from tests.conftest import Sendmail, run_as, script
from tests.support.queue import deferred, put


def postsuper(*args: str, input: bytes = b"") -> subprocess.CompletedProcess[str]:
    p = subprocess.run([script("postsuper"), *args], input=input, capture_output=True,
                       timeout=120)
    return subprocess.CompletedProcess(p.args, p.returncode, p.stdout.decode(),
                                       p.stderr.decode())


@pytest.fixture
def queue(sendmail: Sendmail) -> Queue:
    q = Queue(str(sendmail.queue_dir))
    q.ensure()
    return q


def states(q: Queue) -> dict[str, list[str]]:
    return {s: sorted(q.ids(s)) for s in ("incoming", "deferred", "hold")}


def three(q: Queue) -> list[str]:
    return [put(q, f"Id{i}", f"s{i}@x.test", [deferred(f"r{i}@y.test")]) for i in range(3)]


def test_delete_named_all_and_stdin(queue: Queue) -> None:
    a, b, c = three(queue)
    p = postsuper("-d", a)
    assert (p.returncode, p.stdout) == (0, "")
    assert p.stderr == f"postsuper: {a}: removed\npostsuper: Deleted: 1 message\n"
    assert not os.path.exists(queue.root + f"/messages/{a}")
    p = postsuper("-d", "all")  # lower case is an id that matches nothing
    assert (p.returncode, p.stderr) == (0, "postsuper: Deleted: 0 messages\n")
    p = postsuper("-d", "-", input=f"{b}\n{b}\nNoSuch1\n".encode())
    assert p.stderr == f"postsuper: {b}: removed\npostsuper: Deleted: 1 message\n"
    p = postsuper("-d", "ALL")
    assert (p.returncode, p.stderr) == (0, "postsuper: Deleted: 1 messages\n".replace(
        "1 messages", "1 message"))
    assert states(queue) == {"incoming": [], "deferred": [], "hold": []}
    _settled(queue)  # the files of a whole-queue delete go in the background
    assert not os.listdir(queue.root + "/messages") and not os.listdir(queue.root + "/history")


def test_hold_release_requeue(queue: Queue) -> None:
    a, b, c = three(queue)
    mtime = os.stat(queue.path("deferred", b)).st_mtime
    p = postsuper("-h", "ALL")
    assert (p.returncode, p.stderr) == (0, "postsuper: Placed on hold: 3 messages\n")
    assert states(queue)["hold"] == [a, b, c]
    p = postsuper("-H", b)
    assert p.stderr == f"postsuper: {b}: released from hold\npostsuper: Released from hold: " \
                       "1 message\n"
    assert os.stat(queue.path("deferred", b)).st_mtime == mtime  # its schedule is kept
    _, env = queue.load(c, HOLD)
    env.recipients[0].next_try = time.time() + 9999
    queue.write_envelope(env, HOLD)
    p = postsuper("-r", c)
    assert p.stderr == f"postsuper: {c}: requeued\npostsuper: Requeued: 1 message\n"
    state, env = queue.load(c)
    assert state == INCOMING and env.recipients[0].next_try == 0.0
    assert env.recipients[0].reason  # the history of the entry is kept
    p = postsuper("-d", "ALL", "deferred")  # a queue operand narrows the search
    assert p.stderr == "postsuper: Deleted: 1 message\n"
    assert states(queue) == {"incoming": [c], "deferred": [], "hold": [a]}
    p = postsuper("-H", "ALL", "-r", "ALL")
    assert p.stderr == "postsuper: Requeued: 2 messages\npostsuper: Released from hold: " \
                       "0 messages\n"
    assert states(queue) == {"incoming": [a, c], "deferred": [], "hold": []}


def test_selectors_choose_what_an_operation_touches(queue: Queue) -> None:
    now = time.time()
    put(queue, "Spam1", "spammer@example.com", [deferred("a@y.test")], arrival=now - 7200)
    put(queue, "Spam2", "spammer@example.com", [deferred("b@y.test")], arrival=now)
    put(queue, "Ham1", "friend@example.com", [deferred("c@y.test")], arrival=now - 7200)
    p = postsuper("-d", "--from", "spammer@example.com", "--older-than", "1h")
    assert (p.returncode, p.stderr) == (0, "postsuper: Deleted: 1 message\n")
    assert states(queue)["deferred"] == ["Ham1", "Spam2"]
    p = postsuper("-h", "ALL", "--to=@y.test", "--newer-than", "1h")
    assert p.stderr == "postsuper: Placed on hold: 1 message\n"
    assert states(queue)["hold"] == ["Spam2"]
    p = postsuper("--from", "x@y")
    assert p.returncode == 64 and "need an operation" in p.stderr


@pytest.mark.parametrize("bad", ["../../etc/passwd", "../../canary", "", ".", "..", "ABC/DEF",
                                 "ABC\n", "A" * 10000, "١٢٣", "ＡＢＣ", "ID;rm -rf /"])
def test_invalid_ids_exit_64_before_any_action(queue: Queue, bad: str) -> None:
    """A bad id (path syntax, control or non-ASCII characters, oversized) exits 64 before any
    action: nothing is touched (the good id given first survives too)."""
    (a, *_) = three(queue)
    canary = Path(queue.root).parent / "canary"  # what "../../canary" would reach
    canary.write_bytes(b"keep")
    Path(queue.root, "messages", "canary").symlink_to(canary)
    for argv in (["-d", a, "-d", bad], ["-h", bad], ["-r", bad]):
        p = postsuper(*argv)
        assert p.returncode == 64, p.stderr
        assert p.stderr.startswith("postsuper: invalid queue id: ")
        assert p.stderr.count("\n") == 1  # one line, whatever the id holds
    assert canary.read_bytes() == b"keep" and Path("/etc/passwd").stat().st_size > 0
    assert len(states(queue)["deferred"]) == 3


def test_stdin_bad_lines_warned_good_ones_processed(queue: Queue) -> None:
    """Ids read from stdin: bad lines are warned about (exit 65), good ones still processed."""
    a, b, c = three(queue)
    p = postsuper("-d", "-", input=f"{a}\n../x\n{b}*\n{c}\r\n\n".encode() + b"\xff\n")
    assert p.returncode == 65
    assert "postsuper: warning: invalid mail queue id: ../x\n" in p.stderr
    assert f"postsuper: warning: invalid mail queue id: {b}*\n" in p.stderr
    assert p.stderr.count("invalid mail queue id") == 3
    assert f"postsuper: {a}: removed\n" in p.stderr and f"postsuper: {c}: removed\n" in p.stderr
    assert p.stderr.endswith("postsuper: Deleted: 2 messages\n")
    assert states(queue)["deferred"] == [b]


def test_usage_errors_and_bad_queue_names(queue: Queue) -> None:
    for argv, text in ((["-Z"], "invalid option -- 'Z'"), (["-d"], "requires an argument"),
                       (["-d", "Id0", "Id1"], "invalid directory name: Id1"),
                       (["-d", "ALL", "corrupt"], "invalid directory name: corrupt"),
                       (["-d", "-", "-h", "-"], "standard input"),
                       (["-e", "Id0"], "not supported")):
        three(queue) if not states(queue)["deferred"] else None
        p = postsuper(*argv)
        assert p.returncode == 64 and text in p.stderr, (argv, p.stderr)
        assert len(states(queue)["deferred"]) == 3
    assert postsuper().returncode == 0  # no operation: nothing to do, silently


def test_busy_entry_is_skipped_and_said(queue: Queue) -> None:
    """An entry a runner is delivering is never deleted under it: skipped, exit 75."""
    a, b, _ = three(queue)
    fd = queue.lock(a)
    try:
        p = postsuper("-d", a, "-d", b)
        p_all = postsuper("-h", "ALL")
    finally:
        os.close(fd)
    assert p.returncode == 75 and p_all.returncode == 75
    assert f"postsuper: warning: {a}: skipped: the message is being delivered" in p.stderr
    assert p.stderr.endswith("postsuper: Deleted: 1 message\n")
    assert p_all.stderr.endswith("postsuper: Placed on hold: 1 message\n")
    assert states(queue)["deferred"] == [a]
    state, env = queue.load(a)  # untouched and whole
    assert state == "deferred" and env.recipients[0].address == "r0@y.test"


def test_purge_and_structure_check(queue: Queue) -> None:
    a, b, c = three(queue)
    old = time.time() - 7200
    stale = Path(queue.root, "tmp", "dead.env.123")
    stale.write_bytes(b"half")
    fresh = Path(queue.root, "tmp", "busy.env.456")
    fresh.write_bytes(b"being written")
    orphan = Path(queue.root, "messages", "Orphan1")
    orphan.write_bytes(b"no envelope")
    for p in (stale, orphan):
        os.utime(p, (old, old))
    Path(queue.path("deferred", a)).write_bytes(b"torn envelope")
    os.unlink(queue.path("messages", b))
    Path(queue.root, "deferred", "bad.name").write_bytes(b"stray")
    p = postsuper("-p", "-s", "-v")
    assert p.returncode == 0
    assert not stale.exists() and fresh.exists() and not orphan.exists()
    assert "postsuper: tmp/dead.env.123: removed" in p.stderr
    assert f"postsuper: warning: {a}: moved to corrupt/" in p.stderr
    assert f"postsuper: warning: {b}: moved to corrupt/: message file missing" in p.stderr
    assert "deferred/bad.name: moved to corrupt/: not a queue id" in p.stderr
    assert states(queue)["deferred"] == [c]
    corrupt = os.listdir(queue.root + "/corrupt")
    assert a in corrupt and b in corrupt and any(n.startswith("stray-deferred-") for n in corrupt)


def test_config_directory_option(queue: Queue, config_file: Path,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    three(queue)
    monkeypatch.delenv("PYMAILTOOLS_CONFIG")
    p = postsuper("-c", str(config_file.parent), "-d", "ALL")
    assert p.stderr == "postsuper: Deleted: 3 messages\n"


def as_user(user: pwd.struct_passwd, cfg: Path, argv: list[str]) -> int:
    """postsuper's main() as an ordinary user, in a forked child (see test_pickup.submit_as)."""
    import pymailtools.admin.postsuper  # noqa: F401  (the child cannot read /root's interpreter)
    import pymailtools.cli.postsuper as cli
    import pymailtools.config  # noqa: F401

    return run_as(user, lambda: cli.main(argv), config=cfg, quiet=True)


def test_ordinary_user_gets_77(world_dir: Path, system_user: pwd.struct_passwd) -> None:
    q = Queue(str(world_dir / "q"))
    q.ensure()
    put(q, "Keep1", "s@x.test", [deferred("r@y.test")])
    cfg = world_dir / "config.toml"
    cfg.write_text(f'queue_directory = "{q.root}"\nsyslog = false\n')
    cfg.chmod(0o644)
    assert as_user(system_user, cfg, ["-d", "ALL"]) == 77
    assert as_user(system_user, cfg, ["-p"]) == 77
    assert q.ids("deferred") == ["Keep1"]
    os.chown(q.root, system_user.pw_uid, system_user.pw_gid)  # a per-user queue: its owner
    assert as_user(system_user, cfg, []) == 0


def test_delete_all_while_a_runner_delivers(sendmail: Sendmail, queue: Queue,
                                            system_user: pwd.struct_passwd,
                                            spool: Path) -> None:
    """1,000 local messages; `postsuper -d ALL` during `sendmail -q`. Every message is
    delivered once or deleted, never both, and the mailbox holds only whole messages."""
    n = 1000
    body = "Subject: m{0}\nMessage-Id: <m{0}@x.test>\n\nbody {0}\n"
    ids = []
    for i in range(n):
        sub = queue.submission()
        sub.write(body.format(i).encode())
        ids.append(sub.commit(Envelope("", "s@x.test", [Recipient(system_user.pw_name)],
                                       arrival=time.time())))
    runner = subprocess.Popen([script("sendmail"), "-q"], env=dict(
        os.environ, PYMAILTOOLS_CONFIG=str(sendmail.config_file)),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    mbox = spool / system_user.pw_name
    deadline = time.time() + 60
    while not (mbox.exists() and mbox.stat().st_size > 0) and time.time() < deadline:
        time.sleep(0.01)
    p = postsuper("-v", "-d", "ALL")
    runner.wait(timeout=300)
    assert runner.returncode == 0, runner.stderr
    assert p.returncode in (0, 75), p.stderr
    deleted = {line.split(": ")[1] for line in p.stderr.splitlines()
               if line.endswith(": removed")}
    busy = {line.split(": ")[2] for line in p.stderr.splitlines() if ": skipped: " in line}
    text = mbox.read_text() if mbox.exists() else ""
    subjects = [line[len("Subject: m"):] for line in text.splitlines()
                if line.startswith("Subject: m")]
    delivered = {ids[int(s)] for s in subjects}
    assert len(subjects) == len(delivered), "a message was delivered twice"
    assert not (deleted & delivered), "deleted and delivered"
    assert deleted | delivered == set(ids), "a message was lost"
    assert busy <= delivered, "skipped as busy, yet not delivered by the runner"
    assert 0 < len(deleted) < n, "the two did not overlap; the test proves nothing"
    assert f"postsuper: Deleted: {len(deleted)} messages" in p.stderr
    assert text.count("\nbody ") + text.startswith("body ") == len(delivered)  # whole
    assert states(queue) == {"incoming": [], "deferred": [], "hold": []}
    assert not os.listdir(queue.root + "/messages")


def _settled(queue: Queue, timeout: float = 120) -> None:
    """Wait for postsuper's background settling: trash/ empty."""
    trash = Path(queue.root, "trash")
    deadline = time.time() + timeout
    while trash.exists() and any(trash.iterdir()) and time.time() < deadline:
        time.sleep(0.05)
    assert not (trash.exists() and any(trash.iterdir())), "trash/ never settled"


def test_bulk_delete_all_while_a_runner_delivers(sendmail: Sendmail, queue: Queue,
                                                 system_user: pwd.struct_passwd,
                                                 spool: Path) -> None:
    """The same race with the directory swap (no -v): counted deletions plus deliveries make
    exactly the messages queued, none twice, and the space is reclaimed in the background."""
    n = 1000
    body = "Subject: m{0}\nMessage-Id: <m{0}@x.test>\n\nbody {0}\n"
    for i in range(n):
        sub = queue.submission()
        sub.write(body.format(i).encode())
        sub.commit(Envelope("", "s@x.test", [Recipient(system_user.pw_name)],
                            arrival=time.time()))
    env = dict(os.environ, PYMAILTOOLS_CONFIG=str(sendmail.config_file))
    runner = subprocess.Popen([script("sendmail"), "-q"], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    mbox = spool / system_user.pw_name
    deadline = time.time() + 60
    while not (mbox.exists() and mbox.stat().st_size > 0) and time.time() < deadline:
        time.sleep(0.01)
    p = postsuper("-d", "ALL")
    runner.wait(timeout=300)
    assert runner.returncode == 0, runner.stderr
    assert p.returncode in (0, 75), p.stderr
    _settled(queue)
    # entries skipped as busy were put back: one more run delivers them
    subprocess.run([script("sendmail"), "-q"], env=env, check=True, timeout=300)
    deleted = int(p.stderr.rsplit("postsuper: Deleted: ", 1)[1].split()[0])
    text = mbox.read_text()
    subjects = [line for line in text.splitlines() if line.startswith("Subject: m")]
    assert len(subjects) == len(set(subjects)), "a message was delivered twice"
    assert 0 < deleted < n, "the two did not overlap; the test proves nothing"
    assert deleted + len(subjects) == n, "deleted and delivered, or lost"
    assert states(queue) == {"incoming": [], "deferred": [], "hold": []}
    assert not os.listdir(queue.root + "/messages")


@pytest.mark.parametrize(("crash_at", "survivors"), [("bulk_swapped", 3), ("bulk_committed", 0)])
def test_bulk_delete_interrupted_is_settled_by_purge(queue: Queue, crash_at: str,
                                                     survivors: int) -> None:
    """Killed right after the swap, nothing is deleted yet: -p puts all back. Killed after
    the commit record, the deletion stands: -p finishes it."""
    three(queue)
    p = subprocess.run([script("postsuper"), "-d", "ALL"], capture_output=True, timeout=60,
                       env=dict(os.environ, PYMAILTOOLS_TEST_CRASH_AT=crash_at))
    assert p.returncode == -9
    assert states(queue) == {"incoming": [], "deferred": [], "hold": []}  # swapped away
    assert postsuper("-p").returncode == 0
    assert len(states(queue)["deferred"]) == survivors
    assert len(os.listdir(queue.root + "/messages")) == survivors
    assert not os.listdir(queue.root + "/trash")


def test_bulk_hold_keeps_schedule_and_bulk_delete_reclaims(queue: Queue) -> None:
    ids = three(queue)
    due = {q: os.stat(queue.path("deferred", q)).st_mtime for q in ids}
    p = postsuper("-h", "ALL")
    assert p.returncode == 0 and p.stderr.endswith("Placed on hold: 3 messages\n")
    assert states(queue)["hold"] == sorted(ids) and not states(queue)["deferred"]
    assert {q: os.stat(queue.path(HOLD, q)).st_mtime for q in ids} == due
    p = postsuper("-d", "ALL")
    assert p.returncode == 0 and p.stderr.endswith("Deleted: 3 messages\n")
    _settled(queue)
    assert states(queue) == {"incoming": [], "deferred": [], "hold": []}
    assert not os.listdir(queue.root + "/messages")


def test_without_renameat2_entries_are_done_one_by_one(queue: Queue,
                                                       monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]
                                                       ) -> None:
    from pymailtools.cli import postsuper as cli
    from pymailtools.queue import bulk

    def unsupported(a: str, b: str) -> None:
        raise bulk.Unsupported(38, "no renameat2")

    monkeypatch.setattr(bulk, "exchange", unsupported)
    three(queue)
    assert cli.main(["-h", "ALL"]) == 0
    assert len(states(queue)["hold"]) == 3
    assert cli.main(["-d", "ALL"]) == 0
    assert "Deleted: 3 messages" in capsys.readouterr().err
    assert states(queue) == {"incoming": [], "deferred": [], "hold": []}
    assert not os.listdir(queue.root + "/messages")  # synchronous: nothing left behind


def test_new_entries_under_two_names_go_through_every_operation(queue: Queue) -> None:
    """A fresh entry is one file, messages/ID and incoming/ID (message + envelope + trailer):
    the structure check keeps it, hold and release move that file, requeue gives it a plain
    envelope, and delete removes both names; its message stays exact throughout."""
    body = b"Subject: two names\n\n" + b"line\n" * 300

    def fresh() -> str:
        sub = queue.submission()
        sub.write(body)
        return sub.commit(Envelope("", "s@x.test", [Recipient("r@y.test")]))

    a, b = fresh(), fresh()
    assert postsuper("-s").returncode == 0
    assert states(queue)["incoming"] == sorted([a, b])
    assert postsuper("-h", a).returncode == 0
    assert os.stat(queue.path(HOLD, a)).st_ino == os.stat(queue.path("messages", a)).st_ino
    assert queue.read_message(a) == body
    assert postsuper("-H", a).returncode == 0 and postsuper("-r", a).returncode == 0
    assert queue.find(a) == INCOMING and os.stat(queue.path("messages", a)).st_nlink == 1
    assert Path(queue.path(INCOMING, a)).read_bytes().startswith(b"pymailtools-envelope 1\n")
    assert queue.read_message(a) == body and postsuper("-s").returncode == 0
    assert postsuper("-d", b).returncode == 0
    assert not os.path.exists(queue.path("messages", b))
    assert states(queue) == {"incoming": [a], "deferred": [], "hold": []}
    assert not os.listdir(queue.root + "/corrupt")


def test_bulk_delete_frees_the_files_of_entries_someone_holds_locked(queue: Queue) -> None:
    """A deleted entry's files go without its lock: a runner that locked one after the
    commit (it then finds no envelope and lets go) does not hold the disk space back."""
    ids = three(queue)
    assert bulk.delete_all(queue, [HOLD, INCOMING, "deferred"]).count == 3
    lock = os.open(queue.path("messages", ids[0]), os.O_RDONLY)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        settling = threading.Thread(target=bulk.settle, args=(queue,), daemon=True)
        settling.start()
        settling.join(30)
        assert not settling.is_alive(), "settling waited for the lock"
        assert not os.listdir(queue.root + "/messages")
        assert not os.listdir(queue.root + "/history")
        assert not os.listdir(queue.root + "/trash")
    finally:
        os.close(lock)

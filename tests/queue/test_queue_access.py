"""Who may use the queue: root sets up a fresh one from any entry point, ordinary users get a
clear answer when it is not set up, may list it (not read it), and -bv says what it could
not check instead of failing."""

import contextlib
import io
import json
import os
import pwd
import stat
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from pymailtools.cli.common import run_main
from pymailtools.config import Config
from pymailtools.errors import ConfigError
from pymailtools.queue.store import DEFERRED, INCOMING, Queue
from tests.conftest import Sendmail, need_root, run_as, script, write_toml
from tests.support.queue import deferred, put


def user_run(user: pwd.struct_passwd, fn: Callable[[], int], config: Path | None = None,
             stdin: Path | None = None) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of ``fn()`` run as ``user`` in a forked child. Import
    what ``fn`` needs first: the child cannot read the venv's interpreter."""
    r, w = os.pipe()

    def body() -> int:
        out, err = io.StringIO(), io.StringIO()
        code = 70
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                code = fn()
        finally:
            os.write(w, json.dumps([out.getvalue(), err.getvalue()]).encode())
        return code

    code = run_as(user, body, config=config, stdin=stdin)
    os.close(w)
    data = b""
    while chunk := os.read(r, 65536):
        data += chunk
    os.close(r)
    out, err = json.loads(data) if data else ("", "")
    return code, out, err


def _import_cli() -> None:
    import pymailtools.address  # noqa: F401
    import pymailtools.admin.listing  # noqa: F401
    import pymailtools.cli.mailq  # noqa: F401
    import pymailtools.cli.postqueue  # noqa: F401
    import pymailtools.cli.sendmail  # noqa: F401
    import pymailtools.local.route  # noqa: F401
    import pymailtools.qmgr.trigger  # noqa: F401
    import pymailtools.qmgr.verify  # noqa: F401
    import pymailtools.queue.format  # noqa: F401
    import pymailtools.submit.submission  # noqa: F401


def sendmail_main(*argv: str) -> Callable[[], int]:
    from pymailtools.cli import sendmail

    return lambda: sendmail.main(list(argv))


def root_place(world_dir: Path) -> Path:
    """A root-owned 0755 directory inside which ordinary users can create nothing."""
    d = world_dir / "sys"
    d.mkdir()
    d.chmod(0o755)
    return d


def config_for(world_dir: Path, queue_dir: Path, **extra: object) -> Path:
    path = write_toml(world_dir / "config.toml", {
        "queue_directory": str(queue_dir), "myhostname": "host.example.test",
        "mydestination": ["host.example.test", "localhost"], "syslog": False,
        "mail_spool_directory": str(world_dir / "spool"),
        "alias_maps": [str(world_dir / "aliases")], **extra})
    path.chmod(0o644)
    return path


# -- 1. a queue directory that does not exist yet ----------------------------------------------

@pytest.mark.parametrize("argv", [
    ["sendmail", "-q"], ["sendmail", "-qIABC123"], ["sendmail", "-qRexample.test"],
    ["postqueue", "-f"], ["postqueue", "-i", "ABC123"], ["postqueue", "-s", "example.test"],
    ["postsuper", "-d", "ALL"], ["postsuper", "-p"],
])
def test_root_sets_up_a_fresh_queue_from_every_entry_point(sendmail: Sendmail,
                                                           argv: list[str]) -> None:
    need_root()
    assert not sendmail.queue_dir.exists()
    p = subprocess.run([script(argv[0]), *argv[1:]], capture_output=True, text=True,
                       timeout=120, env=dict(os.environ,
                                             PYMAILTOOLS_CONFIG=str(sendmail.config_file)))
    assert p.returncode == 0, p.stderr
    assert "permission denied" not in p.stderr
    for name in ("incoming", "deferred", "hold", "messages", "maildrop"):
        assert (sendmail.queue_dir / name).is_dir(), name


def test_root_with_umask_077_leaves_the_path_to_the_queue_reachable(world_dir: Path) -> None:
    """The directories created above a fresh queue are 0755 whatever root's umask: users must
    still reach the maildrop (they got "Permission denied" after root set the queue up)."""
    need_root()
    qdir = world_dir / "a" / "b" / "queue"
    cfg = write_toml(world_dir / "umask.toml", {"queue_directory": str(qdir), "syslog": False})
    p = subprocess.run(["sh", "-c", 'umask 077; exec "$0" -q', script("sendmail")],
                       capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, PYMAILTOOLS_CONFIG=str(cfg)))
    assert p.returncode == 0, p.stderr
    for d in (world_dir / "a", world_dir / "a" / "b", qdir):
        assert stat.S_IMODE(d.stat().st_mode) == 0o755, d
    assert stat.S_IMODE((qdir / "maildrop").stat().st_mode) == 0o1733


@pytest.mark.parametrize("tool", ["mailq", "postqueue"])
def test_an_absent_queue_lists_as_empty(sendmail: Sendmail, tool: str) -> None:
    p = subprocess.run([script(tool), *(["-p"] if tool == "postqueue" else [])],
                       capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, PYMAILTOOLS_CONFIG=str(sendmail.config_file)))
    assert (p.returncode, p.stdout, p.stderr) == (0, "Mail queue is empty\n", "")


def test_user_submission_into_a_root_queue_not_set_up(world_dir: Path,
                                                      system_user: pwd.struct_passwd) -> None:
    _import_cli()
    place = root_place(world_dir)
    qdir = place / "queue"
    cfg = config_for(world_dir, qdir)
    msg = world_dir / "msg"
    msg.write_bytes(b"Subject: hi\n\nbody\n")
    msg.chmod(0o644)
    submit = sendmail_main("sendmail", "-i", "root")
    code, _, err = user_run(system_user, submit, cfg, msg)
    assert (code, err) == (73, f'sendmail: queue {qdir} is not set up: run "sendmail -q" '
                                'once as root\n')
    assert list(place.iterdir()) == []  # nothing half-created
    # The queue root exists, its maildrop does not: the same answer, nothing created.
    qdir.mkdir(mode=0o755)
    code, _, err = user_run(system_user, submit, cfg, msg)
    assert (code, err) == (73, f'sendmail: queue {qdir} is not set up: run "sendmail -q" '
                                'once as root\n')
    assert list(qdir.iterdir()) == []


def test_a_queue_that_cannot_be_created_is_named_not_an_internal_error(
        sendmail: Sendmail, tmp_path: Path, config_values: dict[str, object]) -> None:
    (tmp_path / "link").symlink_to(tmp_path / "nowhere" / "x")  # dangling: mkdir cannot
    write_toml(sendmail.config_file, {**config_values,
                                      "queue_directory": str(tmp_path / "link" / "queue")})
    p = sendmail("-i", "root", input=b"Subject: x\n\nbody\n")
    assert p.returncode == 73, p.stderr
    assert p.stderr.decode() == (f"sendmail: cannot create the queue directory "
                                 f"{tmp_path}/link/queue: File exists\n")


def test_run_main_names_the_file_of_an_os_error(capsys: pytest.CaptureFixture[str]) -> None:
    def denied() -> int:
        raise PermissionError(13, "Permission denied", "/some/file")

    def gone() -> int:
        raise FileNotFoundError(2, "No such file or directory", "/other")

    assert run_main("prog", denied) == 77
    assert run_main("prog", gone, prefix="fatal: ") == 74
    assert capsys.readouterr().err == ("prog: /some/file: Permission denied\n"
                                       "prog: fatal: /other: No such file or directory\n")


# -- 7. mailq for ordinary users ----------------------------------------------------------------

MAILDROP_NOTE = ("{}: messages submitted since the last queue run (in the maildrop) are shown "
                 "to root only\n")


def plain_listings() -> list[tuple[str, Callable[[], int]]]:
    """(name on stderr, main) of each plain listing: mailq, sendmail -bp, postqueue -p."""
    from pymailtools.cli import mailq, postqueue

    return [("mailq", lambda: mailq.main([])), ("sendmail", sendmail_main("sendmail", "-bp")),
            ("postqueue", lambda: postqueue.main(["-p"]))]


@pytest.fixture
def root_queue(world_dir: Path) -> Queue:
    """A root queue set up as `sendmail -q` does, with one deferred entry."""
    need_root()
    q = Queue(str(root_place(world_dir) / "queue"))
    q.ensure()
    put(q, "Rq1", "s@x.test", [deferred("r@y.test")])
    os.chmod(q.path("messages", "Rq1"), 0o600)
    return q


def test_ordinary_users_list_the_queue_but_cannot_read_it(world_dir: Path, root_queue: Queue,
                                                          system_user: pwd.struct_passwd) -> None:
    _import_cli()
    from pymailtools.cli import postqueue

    cfg = config_for(world_dir, Path(root_queue.root))
    for prog, fn in plain_listings():
        code, out, err = user_run(system_user, fn, cfg)
        assert (code, err) == (0, MAILDROP_NOTE.format(prog))  # the maildrop is root's
        assert "Rq1 " in out and "s@x.test" in out and "r@y.test" in out
        assert "Connection refused" in out
    code, out, _ = user_run(system_user, lambda: postqueue.main(["-j"]), cfg)
    assert code == 0 and json.loads(out)["queue_id"] == "Rq1"

    def peek() -> int:
        denied = 0
        for p in (root_queue.path(DEFERRED, "Rq1"), root_queue.path("messages", "Rq1")):
            try:
                open(p, "rb").close()
            except PermissionError:
                denied += 1
        return denied

    assert run_as(system_user, peek) == 2  # neither envelope nor message is readable
    code, _, err = user_run(system_user, lambda: postqueue.main(["-f"]), cfg)
    assert code == 77 and "permission denied" in err
    assert root_queue.ids(DEFERRED) == ["Rq1"]


@pytest.mark.parametrize("mode", [0o755, 0o700])
def test_explain_by_an_ordinary_user_is_refused_not_reported_missing(
        world_dir: Path, root_queue: Queue, system_user: pwd.struct_passwd, mode: int) -> None:
    """mailq --explain needs the envelope, which is root's: an ordinary user is told so (77),
    also where the state directories are still private, never "no such queue entry"."""
    _import_cli()
    from pymailtools.cli import mailq

    for name in (INCOMING, DEFERRED, "hold"):
        os.chmod(root_queue.path(name), mode)
    cfg = config_for(world_dir, Path(root_queue.root))
    code, out, err = user_run(system_user, lambda: mailq.main(["--explain", "Rq1"]), cfg)
    assert (code, out) == (77, "")
    assert "Rq1: cannot read the entry" in err and "permission denied" in err


def test_a_users_own_submission_in_the_maildrop_is_not_listed_as_an_empty_queue(
        world_dir: Path, system_user: pwd.struct_passwd) -> None:
    """Until root's next queue run a user's submission sits in the maildrop (1733), which
    the user cannot list: stdout stays Postfix's, stderr says what was left out."""
    need_root()
    _import_cli()
    from pymailtools.cli import mailq, postqueue
    from pymailtools.queue import maildrop

    q = Queue(str(root_place(world_dir) / "queue"))
    q.ensure()
    cfg = config_for(world_dir, Path(q.root))
    msg = world_dir / "msg"
    msg.write_bytes(b"Subject: hi\n\nbody\n")
    msg.chmod(0o644)
    submit = sendmail_main("sendmail", "-i", "root")
    assert user_run(system_user, submit, cfg, msg) == (0, "", "")
    [qid] = maildrop.names(q)
    for prog, fn in plain_listings():
        assert user_run(system_user, fn, cfg) == (0, "Mail queue is empty\n",
                                                  MAILDROP_NOTE.format(prog)), prog
    assert user_run(system_user, lambda: postqueue.main(["-j"]), cfg) == (
        0, "", MAILDROP_NOTE.format("postqueue"))
    # A listing that does not ask for the maildrop has nothing left out.
    assert user_run(system_user, lambda: mailq.main(["--queue", "deferred"]), cfg) == (
        0, "Mail queue is empty\n", "")
    # Root lists the maildrop: the entry, and no note.
    for argv in (["mailq"], ["sendmail", "-bp"], ["postqueue", "-p"]):
        p = subprocess.run([script(argv[0]), *argv[1:]], capture_output=True, text=True,
                           timeout=120, env=dict(os.environ, PYMAILTOOLS_CONFIG=str(cfg)))
        assert (p.returncode, p.stderr) == (0, ""), argv
        assert p.stdout.splitlines()[1].startswith(qid + " ") and "-- 0 Kbytes in 1 Request." \
            in p.stdout, p.stdout


def test_an_entry_the_index_does_not_describe_is_listed_as_far_as_stat_tells(
        world_dir: Path, root_queue: Queue, system_user: pwd.struct_passwd) -> None:
    _import_cli()
    from pymailtools.cli import mailq

    os.unlink(os.path.join(root_queue.root, "summaries"))
    cfg = config_for(world_dir, Path(root_queue.root))
    code, out, err = user_run(system_user, lambda: mailq.main([]), cfg)
    assert code == 0
    assert "Rq1 " in out and "(unknown)" in out and "-- 0 Kbytes in 1 Request." in out
    assert err.startswith("mailq: warning: 1 queue entry is not in the listing index yet")


def test_a_root_run_brings_an_old_queue_to_the_listing_modes(world_dir: Path, root_queue: Queue
                                                             ) -> None:
    from pymailtools.qmgr.runner import Runner

    index = Path(root_queue.root, "summaries")
    for name in (INCOMING, DEFERRED, "hold"):
        os.chmod(root_queue.path(name), 0o700)
    index.chmod(0o600)
    os.utime(root_queue.path(DEFERRED, "Rq1"), (2**31, 2**31))  # not due: the run keeps it

    def modes() -> dict[str, int]:
        return {p.name: stat.S_IMODE(p.stat().st_mode) for p in Path(root_queue.root).iterdir()
                if p.name in (INCOMING, DEFERRED, "hold", "messages", "history", "summaries")}

    values = {"queue_directory": root_queue.root, "syslog": False,
              "dns_nameservers": ["127.0.0.1:9"], "minimal_backoff_time": 3600}
    Runner(Config(values)).run()
    assert modes() == {INCOMING: 0o755, DEFERRED: 0o755, "hold": 0o755, "messages": 0o700,
                       "history": 0o700, "summaries": 0o644}
    assert stat.S_IMODE(os.stat(root_queue.path(DEFERRED, "Rq1")).st_mode) == 0o600
    # A restricted list closes the listing again.
    Runner(Config({**values, "authorized_mailq_users": ["root"]})).run()
    assert modes() == {INCOMING: 0o700, DEFERRED: 0o700, "hold": 0o700, "messages": 0o700,
                       "history": 0o700, "summaries": 0o600}


def test_a_restricted_list_refuses_in_postfix_words(world_dir: Path, root_queue: Queue,
                                                    system_user: pwd.struct_passwd) -> None:
    _import_cli()
    from pymailtools.cli import mailq, postqueue

    cfg = config_for(world_dir, Path(root_queue.root), authorized_mailq_users=["root"],
                     authorized_flush_users=["root"])
    who = f"User {system_user.pw_name}({system_user.pw_uid}) is not allowed to"
    for fn, text in ((lambda: mailq.main([]), f"mailq: {who} view the mail queue\n"),
                     (lambda: mailq.main(["--json"]), f"mailq: {who} view the mail queue\n"),
                     (sendmail_main("sendmail", "-bp"), f"sendmail: {who} view the mail queue\n"),
                     (lambda: postqueue.main(["-p"]),
                      f"postqueue: fatal: {who} view the mail queue\n"),
                     (lambda: postqueue.main(["-f"]),
                      f"postqueue: fatal: {who} flush the mail queue\n"),
                     (sendmail_main("sendmail", "-q"), f"sendmail: {who} flush the mail queue\n")):
        assert user_run(system_user, fn, cfg) == (77, "", text)
    assert root_queue.ids(DEFERRED) == ["Rq1"]


def test_authorized_users_keys() -> None:
    assert Config({}).authorized_mailq_users == ["static:anyone"]
    assert Config({}).authorized_flush_users == ["static:anyone"]
    assert Config({}).public_listing
    c = Config({"authorized_mailq_users": "root, alice", "authorized_flush_users": []})
    assert c.authorized_mailq_users == ["root", "alice"] and not c.public_listing
    assert c.authorized_flush_users == [] and c.warnings == []
    with pytest.raises(ConfigError, match="authorized_mailq_users"):
        Config({"authorized_mailq_users": "hash:/etc/postfix/users"})


# -- 7. sendmail -bv without root ---------------------------------------------------------------

def test_bv_as_an_ordinary_user_says_what_it_could_not_check(
        world_dir: Path, system_user: pwd.struct_passwd, other_user: pwd.struct_passwd) -> None:
    _import_cli()
    home = Path(other_user.pw_dir)
    (home / ".forward").write_text("elsewhere@example.test\n")
    os.chown(home / ".forward", other_user.pw_uid, other_user.pw_gid)
    home.chmod(0o700)
    cfg = config_for(world_dir, world_dir / "sys" / "queue")
    code, out, _ = user_run(system_user, sendmail_main("sendmail", "-bv", other_user.pw_name),
                            cfg)
    spool = world_dir / "spool"
    assert (code, out) == (0, f"{other_user.pw_name}@host.example.test: deliverable: local "
                              f"mailbox {spool}/{other_user.pw_name} (not verified: cannot read "
                              f"{home}/.forward as an ordinary user)\n")
    # Root reads the .forward and answers in full.
    p = subprocess.run([script("sendmail"), "-bv", other_user.pw_name], capture_output=True,
                       text=True, timeout=60, env=dict(os.environ, PYMAILTOOLS_CONFIG=str(cfg)))
    assert (p.returncode, p.stdout) == (0, f"{other_user.pw_name}@host.example.test: forwarded "
                                           "to elsewhere@example.test\n")


def test_bv_a_temporary_error_is_not_undeliverable(sendmail: Sendmail, tmp_path: Path) -> None:
    # Delivery would defer this recipient and try again (4.3.5), so -bv must not call it
    # undeliverable (67): it could not be verified for now (75).
    (tmp_path / "aliases").write_text(f"list: :include:{tmp_path}/missing\n")
    p = sendmail("-bv", "list")
    assert p.returncode == 75, p.stdout
    out = p.stdout.decode()
    assert out.startswith("list@host.example.test: not verified: ") and "(4.3.5)" in out

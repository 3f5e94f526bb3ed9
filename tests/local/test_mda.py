"""Mailbox delivery through mailbox_command(_maps) and into the home directory (home_mailbox):
the real procmail and maildrop, real users, the queue run by the installed sendmail -q."""

import grp
import io
import mailbox
import os
import pwd
import subprocess
from pathlib import Path

import pytest

from pymailtools.config import Config
from pymailtools.errors import ConfigError, DeliveryError
from pymailtools.local import mailbox as local_mailbox
from pymailtools.local import route
from tests.conftest import Sendmail, need_root, need_tool, write_toml
from tests.support import queue as support_queue

User = pwd.struct_passwd
SENDER = "sender@example.test"


def mta(tmp_path: Path, config_values: dict[str, object], **keys: object) -> Sendmail:
    """The installed sendmail with the test settings plus ``keys``."""
    need_root()
    values = {**config_values, **keys}
    return Sendmail(write_toml(tmp_path / "mda.toml", values),
                    Path(str(values["queue_directory"])))


def submit(sm: Sendmail, rcpt: str, subject: str, body: str = "hello\n") -> None:
    msg = f"From: {SENDER}\nSubject: {subject}\n\n{body}".encode()
    p = sm("-i", "-f", SENDER, rcpt, input=msg)
    assert p.returncode == 0, p.stderr


def run_queue(sm: Sendmail) -> None:
    p = sm("-q")
    assert p.returncode == 0, p.stderr


def retry(sm: Sendmail) -> None:
    """Run every queued message now, due or not (sendmail -qI)."""
    for _, env, _ in sm.entries():
        p = sm("-qI" + env.id)
        assert p.returncode == 0, p.stderr


def queued(sm: Sendmail) -> list[tuple[str, str, str]]:
    """(state, status, reason) of every recipient still queued."""
    return [(state, r.status, r.reason) for state, env, _ in sm.entries()
            for r in env.recipients if not r.done]


def user_file(user: User, name: str, text: str, mode: int = 0o644) -> Path:
    """A file in ``user``'s home, owned by them."""
    path = Path(user.pw_dir) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    os.chown(path.parent, user.pw_uid, user.pw_gid)
    path.write_text(text)
    os.chown(path, user.pw_uid, user.pw_gid)
    os.chmod(path, mode)
    return path


def messages(path: Path) -> list[mailbox.mboxMessage]:
    return list(mailbox.mbox(str(path), create=False))


# A script that reports who it runs as, where, with what environment, arguments and input.
REPORT = """#!/bin/sh
out="$(dirname "$0")/report"
{
  echo "uid=$(id -u) gid=$(id -g) groups=$(id -G)"
  echo "cwd=$(pwd)"
  for a in "$@"; do echo "arg=$a"; done
  tr '\\0' '\\n' < /proc/$$/environ | sed 's/^/env:/'
} > "$out.tmp"
cat > "$(dirname "$0")/stdin"
mv "$out.tmp" "$out"
"""


def report(user: User) -> tuple[dict[str, str], list[str], str]:
    """(environment, other lines, stdin) the REPORT script saw."""
    home = Path(user.pw_dir)
    env, lines = {}, []
    for line in (home / "bin" / "report").read_text().splitlines():
        if line.startswith("env:"):
            k, _, v = line[4:].partition("=")
            env[k] = v
        else:
            lines.append(line)
    return env, lines, (home / "bin" / "stdin").read_text()


# -- procmail ----------------------------------------------------------------------------------

PROCMAILRC = """\
MAILDIR=$HOME/Mail
DEFAULT=$HOME/Mail/inbox
LOGFILE=$HOME/procmail.log

:0
* ? test -f $HOME/hold
{
  EXITCODE=75
  :0
  /dev/null
}

EXT=$1
:0:
* EXT ?? ^^lists^^
lists

:0:
* ^Subject:.*invoice
invoices

:0
* ^Subject:.*pipe me
| /usr/bin/tee $HOME/piped > /dev/null
"""


def procmail_mta(tmp_path: Path, config_values: dict[str, object], user: User,
                 **keys: object) -> Sendmail:
    path = need_tool("procmail", "procmail")
    user_file(user, ".procmailrc", PROCMAILRC)
    (Path(user.pw_dir) / "Mail").mkdir()
    os.chown(Path(user.pw_dir) / "Mail", user.pw_uid, user.pw_gid)
    return mta(tmp_path, config_values, mailbox_command=f'{path} -a "$EXTENSION"', **keys)


@pytest.fixture
def procmail(tmp_path: Path, config_values: dict[str, object],
             system_user: User) -> Sendmail:
    return procmail_mta(tmp_path, config_values, system_user)


def test_procmail_files_by_subject(procmail: Sendmail, system_user: User, spool: Path) -> None:
    name = system_user.pw_name
    submit(procmail, name, "invoice 42", "From the accounts\n")
    submit(procmail, name, "lunch?")
    run_queue(procmail)
    assert queued(procmail) == []
    mail = Path(system_user.pw_dir) / "Mail"
    (inv,) = messages(mail / "invoices")
    assert inv["Subject"] == "invoice 42"
    # The From_ line, Return-Path: and Delivered-To: we put before the message.
    assert inv.get_from().startswith(SENDER + " ")
    assert inv["Return-Path"] == f"<{SENDER}>"
    assert inv["Delivered-To"] == f"{name}@host.example.test"
    assert (mail / "invoices").stat().st_uid == system_user.pw_uid
    (other,) = messages(mail / "inbox")
    assert other["Subject"] == "lunch?"
    assert os.listdir(spool) == []  # the command took the place of the spool mailbox


def test_procmail_gets_the_address_extension(tmp_path: Path,
                                             config_values: dict[str, object],
                                             system_user: User) -> None:
    sm = procmail_mta(tmp_path, config_values, system_user, recipient_delimiter="+")
    name = system_user.pw_name
    submit(sm, f"{name}+Lists@host.example.test", "newsletter")
    submit(sm, f"{name}+other@host.example.test", "not a list")
    run_queue(sm)
    assert queued(sm) == []
    mail = Path(system_user.pw_dir) / "Mail"
    (m,) = messages(mail / "lists")  # procmail -a "$EXTENSION" made $1 "lists"
    assert m["Subject"] == "newsletter"
    assert m["Delivered-To"] == f"{name}+Lists@host.example.test"
    (other,) = messages(mail / "inbox")
    assert other["Subject"] == "not a list"


def test_procmail_pipes_to_a_command(procmail: Sendmail, system_user: User) -> None:
    submit(procmail, system_user.pw_name, "pipe me", "piped body\n")
    run_queue(procmail)
    assert queued(procmail) == []
    piped = (Path(system_user.pw_dir) / "piped").read_text()
    assert piped.startswith(f"From {SENDER} ")
    assert "Subject: pipe me\n" in piped and "\n\npiped body\n" in piped


def test_procmail_exit_75_defers_then_delivers(procmail: Sendmail, system_user: User) -> None:
    hold = user_file(system_user, "hold", "")
    submit(procmail, system_user.pw_name, "later")
    run_queue(procmail)
    ((state, status, reason),) = queued(procmail)
    assert state == "deferred" and status == "4.3.0"
    assert reason.startswith('temporary failure: /usr/bin/procmail -a "$EXTENSION" exited with '
                             'status 75')
    assert not (Path(system_user.pw_dir) / "Mail" / "inbox").exists()
    hold.unlink()
    retry(procmail)
    assert queued(procmail) == []
    (m,) = messages(Path(system_user.pw_dir) / "Mail" / "inbox")
    assert m["Subject"] == "later"


# -- maildrop ----------------------------------------------------------------------------------

MAILFILTER = """\
DEFAULT="$HOME/inbox"
if (/^Subject:.*report/)
{
  to "$HOME/reports"
}
"""


def maildrop_command() -> str:
    # maildrop refuses an mbox From_ line before the headers (maildrop(1)), and every command
    # gets one, as from Postfix: its own reformail -f0 turns it into Return-Path:.
    reformail = need_tool("reformail", "maildrop")
    return f'{reformail} -f0 | {need_tool("maildrop", "maildrop")} -d "$USER"'


def test_maildrop_mailfilter(tmp_path: Path, config_values: dict[str, object],
                             system_user: User) -> None:
    user_file(system_user, ".mailfilter", MAILFILTER, mode=0o600)
    sm = mta(tmp_path, config_values, mailbox_command=maildrop_command())
    submit(sm, system_user.pw_name, "weekly report")
    submit(sm, system_user.pw_name, "chat")
    run_queue(sm)
    assert queued(sm) == []
    home = Path(system_user.pw_dir)
    (rep,) = messages(home / "reports")
    assert rep["Subject"] == "weekly report"
    assert rep["Delivered-To"] == f"{system_user.pw_name}@host.example.test"
    assert rep.get_all("Return-Path") == [f"<{SENDER}>"]
    assert (home / "reports").stat().st_uid == system_user.pw_uid
    (chat,) = messages(home / "inbox")
    assert chat["Subject"] == "chat"


def test_maildrop_refusing_its_filter_file_defers(tmp_path: Path,
                                                  config_values: dict[str, object],
                                                  system_user: User) -> None:
    f = user_file(system_user, ".mailfilter", MAILFILTER, mode=0o600)
    os.chown(f, 0, 0)  # not the user's own: maildrop will not run it, and says so
    os.chmod(f, 0o644)
    sm = mta(tmp_path, config_values, mailbox_command=maildrop_command())
    submit(sm, system_user.pw_name, "weekly report")
    run_queue(sm)
    ((state, status, reason),) = queued(sm)
    assert (state, status) == ("deferred", "4.3.0")
    assert "mailfilter file is owned by the wrong user" in reason
    assert not (Path(system_user.pw_dir) / "reports").exists()


# -- what the command gets -----------------------------------------------------------------------

@pytest.mark.parametrize("shell", [False, True])
def test_command_environment_identity_and_input(
        tmp_path: Path, config_values: dict[str, object], system_user: User,
        shell: bool) -> None:
    subprocess.run(["usermod", "-a", "-G", "mail", system_user.pw_name], check=True)
    script = user_file(system_user, "bin/report.sh", REPORT, mode=0o755)
    # Without shell metacharacters the command runs directly, split on blanks; with them (the
    # quotes and $VARIABLEs here) /bin/sh runs it and expands the variables we export.
    command = f'{script} "$SENDER" "${{LOCAL}}" "$EXTENSION"' if shell else f"{script} one two"
    sm = mta(tmp_path, config_values, mailbox_command=command)
    submit(sm, system_user.pw_name, "env")
    run_queue(sm)
    assert queued(sm) == []
    env, lines, stdin = report(system_user)
    name, home = system_user.pw_name, system_user.pw_dir
    env.pop("PWD") if shell else None  # /bin/sh's own export
    assert sorted(env) == ["DOMAIN", "HOME", "LOCAL", "LOGNAME", "ORIGINAL_RECIPIENT", "PATH",
                           "RECIPIENT", "SENDER", "SHELL", "USER"]  # no extension here
    assert env["HOME"] == home and env["USER"] == env["LOGNAME"] == name
    assert env["SHELL"] == system_user.pw_shell and env["PATH"] == "/usr/bin:/bin"
    assert env["SENDER"] == SENDER and env["RECIPIENT"] == f"{name}@host.example.test"
    assert env["ORIGINAL_RECIPIENT"] == f"{name}@host.example.test"
    assert env["LOCAL"] == name and env["DOMAIN"] == "host.example.test"
    mail_gid = grp.getgrnam("mail").gr_gid
    assert lines[0] == f"uid={system_user.pw_uid} gid={system_user.pw_gid} groups=" + " ".join(
        str(g) for g in sorted({system_user.pw_gid, mail_gid},
                               key=lambda g: g != system_user.pw_gid))
    assert lines[1] == f"cwd={home}"
    args = [line[4:] for line in lines if line.startswith("arg=")]
    assert args == ([SENDER, name, ""] if shell else ["one", "two"])
    head = f"From {SENDER} "
    assert stdin.startswith(head)
    first, rest = stdin.split("\n", 1)
    assert rest.startswith(f"Return-Path: <{SENDER}>\nDelivered-To: {name}@host.example.test\n"
                           "Received: ")
    assert f"\nFrom: {SENDER}\nSubject: env\n" in rest
    assert stdin.endswith("\n\nhello\n")


def test_extension_and_censored_values(config: Config, system_user: User) -> None:
    need_root()
    user_file(system_user, "bin/report.sh", REPORT, mode=0o755)
    config.recipient_delimiter = "+"
    config.mailbox_command = f"{system_user.pw_dir}/bin/report.sh \"$EXTENSION\""
    name = system_user.pw_name
    local_mailbox.deliver(config, name, io.BytesIO(b"Subject: x\n\nbody\n"),
                          sender="we`ird$(x)@example.test", recipient=f"{name}+Lists@Host.test",
                          original_recipient=f"{name}+Lists@Host.test")
    env, lines, _ = report(system_user)
    assert env["EXTENSION"] == "lists" and env["LOCAL"] == f"{name}+lists"
    assert env["DOMAIN"] == "host.test" and env["RECIPIENT"] == f"{name}+Lists@Host.test"
    assert env["SENDER"] == "we_ird__x_@example.test"  # shell characters never reach it
    assert "arg=lists" in lines


def test_root_mail_runs_as_default_privs(config: Config, world_dir: Path) -> None:
    need_root()
    out = world_dir / "who"
    config.mailbox_command = f"/bin/sh -c 'id -u > {out}'"
    local_mailbox.deliver(config, "root", io.BytesIO(b"Subject: x\n\nbody\n"),
                          sender=SENDER, recipient="root@host.example.test")
    assert int(out.read_text()) == pwd.getpwnam("nobody").pw_uid


# -- failures ----------------------------------------------------------------------------------

@pytest.mark.parametrize(("command", "words"), [
    ("/nonexistent/procmail", ["cannot execute /nonexistent/procmail",
                               "No such file or directory"]),
    ('/nonexistent/procmail -a "$EXTENSION"', ["command not found", "/nonexistent/procmail"]),
    ("{home}/not-executable", ["cannot execute", "Permission denied"]),
    ("nosuchprogram-pmt", ["command not found", "nosuchprogram-pmt"]),
])
def test_missing_or_unusable_command_defers(
        tmp_path: Path, config_values: dict[str, object], system_user: User, spool: Path,
        command: str, words: list[str]) -> None:
    user_file(system_user, "not-executable", "#!/bin/sh\nexit 0\n", mode=0o644)
    sm = mta(tmp_path, config_values,
             mailbox_command=command.format(home=system_user.pw_dir))
    submit(sm, system_user.pw_name, "kept")
    run_queue(sm)
    ((state, status, reason),) = queued(sm)
    assert (state, status) == ("deferred", "4.3.0")
    for w in words:
        assert w in reason
    assert "\n" not in reason
    assert os.listdir(spool) == []  # not delivered anywhere else either


def test_time_limit_defers(tmp_path: Path, config_values: dict[str, object],
                           system_user: User) -> None:
    sm = mta(tmp_path, config_values, mailbox_command="/bin/sleep 30", command_time_limit=1)
    submit(sm, system_user.pw_name, "slow")
    run_queue(sm)
    ((state, status, reason),) = queued(sm)
    assert (state, status) == ("deferred", "4.3.0")
    assert "time limit (1s) exceeded" in reason


def test_exit_status_bounces_with_its_meaning_and_output(config: Config,
                                                         system_user: User) -> None:
    need_root()
    config.mailbox_command = "/bin/sh -c 'echo no such mailbox here; exit 67'"
    with pytest.raises(DeliveryError) as e:
        local_mailbox.deliver(config, system_user.pw_name, io.BytesIO(b"\nbody\n"),
                              sender=SENDER, recipient=f"{system_user.pw_name}@host")
    assert e.value.status == "5.1.1"
    assert e.value.reason.startswith(f"user unknown: {config.mailbox_command} exited with "
                                     "status 67")
    assert e.value.reason.endswith(": no such mailbox here")


# -- mailbox_command_maps ------------------------------------------------------------------------

def test_mailbox_command_maps_picks_per_user(
        tmp_path: Path, config_values: dict[str, object], system_user: User,
        other_user: User, spool: Path) -> None:
    script = user_file(system_user, "bin/report.sh", REPORT, mode=0o755)
    table = tmp_path / "commands"
    table.write_text(f"# per-user commands\n{system_user.pw_name}  {script} mapped\n")
    sm = mta(tmp_path, config_values, mailbox_command_maps=f"texthash:{table}")
    submit(sm, system_user.pw_name, "to the command")
    submit(sm, other_user.pw_name, "to the spool")
    run_queue(sm)
    assert queued(sm) == []
    _, lines, stdin = report(system_user)
    assert "arg=mapped" in lines and "Subject: to the command" in stdin
    assert os.listdir(spool) == [other_user.pw_name]  # no entry: the next rule, the spool
    (m,) = messages(spool / other_user.pw_name)
    assert m["Subject"] == "to the spool"


def test_maps_win_over_mailbox_command_and_home_mailbox(
        tmp_path: Path, config: Config, system_user: User) -> None:
    need_root()
    table = tmp_path / "commands"
    table.write_text(f"{system_user.pw_name} /usr/bin/mapped\n")
    config.mailbox_command_maps = [f"texthash:{table}"]
    config.mailbox_command = "/usr/bin/everyone"
    config.home_mailbox = "Maildir/"
    pw = pwd.getpwnam(system_user.pw_name)
    assert local_mailbox.destination(config, pw) == ("command", "/usr/bin/mapped")
    config.mailbox_command_maps = ""
    assert local_mailbox.destination(config, pw) == ("command", "/usr/bin/everyone")
    assert route.explain(config, system_user.pw_name) == (  # sendmail -bv
        f"{system_user.pw_name}: deliverable: mailbox command /usr/bin/everyone")
    config.mailbox_command = ""
    assert local_mailbox.destination(config, pw) == ("maildir", pw.pw_dir + "/Maildir/")
    assert route.explain(config, system_user.pw_name) == (
        f"{system_user.pw_name}: deliverable: local maildir {pw.pw_dir}/Maildir/")


def test_unusable_table_defers(tmp_path: Path, config_values: dict[str, object],
                               system_user: User, spool: Path) -> None:
    sm = mta(tmp_path, config_values,
             mailbox_command_maps=[f"texthash:{tmp_path}/missing"])
    submit(sm, system_user.pw_name, "kept")
    run_queue(sm)
    ((state, status, reason),) = queued(sm)
    assert (state, status) == ("deferred", "4.3.5")
    assert "mailbox_command_maps" in reason and "missing" in reason
    assert os.listdir(spool) == []


# -- home_mailbox ------------------------------------------------------------------------------

def test_home_mailbox_mbox(tmp_path: Path, config_values: dict[str, object],
                           system_user: User, spool: Path) -> None:
    sm = mta(tmp_path, config_values, home_mailbox="Mailbox")
    submit(sm, system_user.pw_name, "home")
    submit(sm, system_user.pw_name, "again")
    run_queue(sm)
    assert queued(sm) == []
    box = Path(system_user.pw_dir) / "Mailbox"
    st = box.stat()
    assert (st.st_uid, st.st_mode & 0o777) == (system_user.pw_uid, 0o600)
    assert [m["Subject"] for m in messages(box)] == ["home", "again"]
    assert os.listdir(spool) == []


def test_home_mailbox_maildir(tmp_path: Path, config_values: dict[str, object],
                              system_user: User, spool: Path) -> None:
    sm = mta(tmp_path, config_values, home_mailbox="Maildir/")
    submit(sm, system_user.pw_name, "in maildir")
    run_queue(sm)
    assert queued(sm) == []
    md = Path(system_user.pw_dir) / "Maildir"
    (new,) = (md / "new").iterdir()
    assert new.stat().st_uid == system_user.pw_uid
    assert b"Subject: in maildir" in new.read_bytes()
    assert all((md / d).stat().st_uid == system_user.pw_uid for d in ("tmp", "new", "cur"))
    assert os.listdir(spool) == []


@pytest.mark.parametrize("home_mailbox", ["Mailbox", "Maildir/"])
def test_home_mailbox_symlink_is_refused(
        tmp_path: Path, config_values: dict[str, object], system_user: User,
        home_mailbox: str) -> None:
    # A link to a file the user could never write (root's) must lead nowhere.
    victim = tmp_path / "victim"
    if home_mailbox.endswith("/"):
        victim.mkdir()
    else:
        victim.write_bytes(b"")
    link = Path(system_user.pw_dir) / home_mailbox.rstrip("/")
    link.symlink_to(victim)
    os.lchown(link, system_user.pw_uid, system_user.pw_gid)
    sm = mta(tmp_path, config_values, home_mailbox=home_mailbox)
    submit(sm, system_user.pw_name, "not there")
    run_queue(sm)
    ((state, status, reason),) = queued(sm)
    assert state == "deferred" and status.startswith("4.")
    assert "symbolic link" in reason
    assert (list(victim.iterdir()) if victim.is_dir() else victim.read_bytes()) in ([], b"")


def test_home_mailbox_owned_by_someone_else_is_refused(
        tmp_path: Path, config_values: dict[str, object], system_user: User) -> None:
    box = Path(system_user.pw_dir) / "Mailbox"
    box.write_bytes(b"")
    os.chmod(box, 0o666)  # root's, though anyone could write it
    sm = mta(tmp_path, config_values, home_mailbox="Mailbox")
    submit(sm, system_user.pw_name, "not there")
    run_queue(sm)
    ((state, status, reason),) = queued(sm)
    assert state == "deferred" and "not owned by recipient" in reason
    assert box.read_bytes() == b""


@pytest.mark.parametrize("value", ["/var/mail/x", "../Mailbox", "mail/../../x", "./Mailbox",
                                   "Mail//box"])
def test_home_mailbox_must_stay_below_home(value: str) -> None:
    with pytest.raises(ConfigError) as e:
        Config({"home_mailbox": value})
    assert "home_mailbox" in str(e.value)



def _maildir_pids(user: User) -> list[str]:
    """The process id in each delivered file's name (time.M<usec>P<pid>Q<n>.host)."""
    return [n.split("P", 1)[1].split("Q", 1)[0]
            for n in os.listdir(Path(user.pw_dir) / "Maildir" / "new")]


def test_home_maildir_is_written_by_the_runner_itself_with_the_users_ids(
        config_values: dict[str, object], system_user: User) -> None:
    # No process forked per delivery: the runner switches its effective ids (and gets root's
    # back, groups included), the file is still the user's.
    need_root()
    cfg = Config({**config_values, "home_mailbox": "Maildir/"})
    groups = os.getgroups()
    support_queue.queue(cfg, system_user.pw_name)
    assert support_queue.run(cfg).delivered == 1
    assert _maildir_pids(system_user) == [str(os.getpid())]
    (new,) = (Path(system_user.pw_dir) / "Maildir" / "new").iterdir()
    assert (new.stat().st_uid, new.stat().st_gid) == (system_user.pw_uid, system_user.pw_gid)
    assert (os.geteuid(), os.getegid(), os.getgroups()) == (0, 0, groups)


def test_many_local_entries_are_shared_by_mailbox_among_worker_processes(
        config_values: dict[str, object], system_user: User, other_user: User) -> None:
    need_root()
    cfg = Config({**config_values, "home_mailbox": "Maildir/"})
    addresses = [f"{u.pw_name}@{d}" for u in (system_user, other_user)
                 for d in ("host.example.test", "host", "localhost")]
    for i in range(48):
        support_queue.queue(cfg, addresses[i % len(addresses)])
    stats = support_queue.run(cfg)
    assert (stats.delivered, stats.deferred, len(stats.results)) == (48, 0, 48)
    assert support_queue.entries(cfg) == []
    for user in (system_user, other_user):
        pids = _maildir_pids(user)
        assert len(pids) == 24 and str(os.getpid()) not in pids
        # one address, one worker: at most one process per address form
        assert len(set(pids)) <= 3


def test_local_worker_groups_keep_each_recipient_together_largest_first() -> None:
    # The workers take whole recipients, the largest first: the run lasts until the last
    # group taken is done, and a small one ends it sooner.
    from pymailtools.qmgr.runner import LOCAL_WORKERS, _groups, _local_worker_count

    keyed = {f"u{i:03d}@x": [("incoming", f"Q{i:03d}{n:03d}") for n in range(1 + i % 7)]
             for i in range(100)}
    groups = _groups(keyed)
    assert sorted(map(tuple, groups)) == sorted(map(tuple, keyed.values()))
    assert [len(g) for g in groups] == sorted((len(g) for g in groups), reverse=True)
    assert 2 <= _local_worker_count() <= LOCAL_WORKERS


def test_local_workers_take_recipients_as_they_go(
        config_values: dict[str, object], system_user: User, other_user: User,
        monkeypatch: pytest.MonkeyPatch) -> None:
    # Two workers; one dies on its first group (the largest). The other takes every other
    # recipient from the shared list: only the dead worker's group waits for the next run
    # (with fixed shares, the dead worker's share held two more recipients).
    need_root()
    from pymailtools.qmgr import runner as runner_mod

    cfg = Config({**config_values, "home_mailbox": "Maildir/"})
    crash = f"{system_user.pw_name}@host.example.test"
    others = [f"{u.pw_name}@{d}" for u in (system_user, other_user)
              for d in ("host", "localhost", "host.example.test")]
    others.remove(crash)
    for _ in range(12):
        support_queue.queue(cfg, crash)
    for i in range(40):
        support_queue.queue(cfg, others[i % len(others)])
    parent = os.getpid()
    real_deliver = runner_mod.Runner._deliver

    def deliver(self: runner_mod.Runner, env: object, r: object, msg: object) -> object:
        if os.getpid() != parent and r.address == crash:  # type: ignore[attr-defined]
            os._exit(70)
        return real_deliver(self, env, r, msg)  # type: ignore[arg-type]

    monkeypatch.setattr(runner_mod.Runner, "_deliver", deliver)
    monkeypatch.setattr(runner_mod, "LOCAL_WORKERS", 2)
    stats = support_queue.run(cfg)
    assert (stats.delivered, stats.deferred) == (40, 0)
    left = support_queue.entries(cfg)
    assert len(left) == 12
    assert all(env.recipients[0].address == crash for _, env in left)


def test_a_worker_reads_no_envelope_the_look_before_the_fork_has_read(
        config_values: dict[str, object], system_user: User, other_user: User,
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The runner reads every envelope to choose its worker; a worker finding the same file
    # under incoming/ once it holds the lock uses that reading instead of opening it again.
    need_root()
    cfg = Config({**config_values, "home_mailbox": "Maildir/"})
    addresses = [f"{u.pw_name}@{d}" for u in (system_user, other_user)
                 for d in ("host.example.test", "host", "localhost")]
    ids = [support_queue.queue(cfg, addresses[i % len(addresses)]) for i in range(40)]
    opened = tmp_path / "opened"
    real_open = os.open

    def counting_open(path: str, *args: object, **kwargs: object) -> int:
        if "/incoming/" in str(path):  # from the workers too: appended to one file
            fd = real_open(opened, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            os.write(fd, str(path).rpartition("/")[2].encode() + b"\n")
            os.close(fd)
        return real_open(path, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "open", counting_open)
    stats = support_queue.run(cfg)
    assert (stats.delivered, stats.deferred) == (40, 0)
    assert sorted(opened.read_text().split()) == sorted(ids)


def test_a_worker_reads_an_envelope_again_when_its_file_changed_since_the_look(
        config_values: dict[str, object], system_user: User, other_user: User) -> None:
    # Rewritten between the look at each entry and the lock (a new file under incoming/):
    # the entry is delivered as the new envelope says, not as the look read it.
    from pymailtools.qmgr.runner import Runner
    from pymailtools.queue.envelope import SENT
    from pymailtools.queue.store import INCOMING

    cfg = Config(config_values)
    qid = support_queue.queue(cfg, system_user.pw_name, other_user.pw_name)
    runner = Runner(cfg)
    assert runner._local_key(qid, INCOMING, force=False, site=None, now=0) is not None
    state, env = runner.queue.load(qid, INCOMING)
    env.recipients[0].state = SENT
    runner.queue.write_envelope(env, INCOMING)
    entry = runner._open(qid, INCOMING)
    assert entry is not None
    try:
        assert [r.state for r in entry.env.recipients] == [SENT, "pending"]
    finally:
        entry.close()
    assert runner._looked == {}


def test_a_stopping_worker_lets_go_of_the_work_list_before_it_replies(
        config_values: dict[str, object]) -> None:
    # SIGTERM during a run with more groups than the work list's pipe holds: the parent is
    # still writing the list, and reads the workers' replies only once it is done. A worker
    # that stops must close its end of the list first, or a reply bigger than its pipe
    # leaves both waiting for the other for ever.
    import fcntl
    import time

    from pymailtools.qmgr.runner import Runner

    runner = Runner(Config(config_values))
    runner.stopping = True
    work_r, work_w = os.pipe()
    reply_r, reply_w = os.pipe()
    fcntl.fcntl(reply_w, fcntl.F_SETPIPE_SZ, 4096)
    fcntl.fcntl(reply_w, fcntl.F_SETFL, os.O_NONBLOCK)
    try:
        while True:  # a reply pipe already full: the worker's reply waits for the parent
            os.write(reply_w, b"x" * 4096)
    except BlockingIOError:
        fcntl.fcntl(reply_w, fcntl.F_SETFL, 0)
    pid = os.fork()
    if pid == 0:
        os.close(work_w)
        os.close(reply_r)
        runner._run_worker([], work_r, reply_w, force=False, site=None)  # never returns
    os.close(work_r)
    os.close(reply_w)
    fcntl.fcntl(work_w, fcntl.F_SETFL, os.O_NONBLOCK)
    let_go = False
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.write(work_w, bytes(512))
            except BlockingIOError:
                time.sleep(0.02)  # the list is full and the worker still holds it
            except BrokenPipeError:
                let_go = True
                break
    finally:
        os.close(work_w)
        with os.fdopen(reply_r, "rb") as r:
            r.read()
        os.waitpid(pid, 0)
    assert let_go


def test_home_maildir_failure_gives_the_runner_its_ids_back(
        config_values: dict[str, object], system_user: User) -> None:
    # The delivery fails while the runner has the user's effective ids: root's come back.
    need_root()
    cfg = Config({**config_values, "home_mailbox": "Maildir/"})
    maildir = Path(system_user.pw_dir) / "Maildir"
    maildir.mkdir(mode=0o700)  # root's: the user cannot write in it
    groups = os.getgroups()
    support_queue.queue(cfg, system_user.pw_name)
    stats = support_queue.run(cfg)
    assert stats.delivered == 0 and stats.deferred + stats.bounced == 1
    assert (os.geteuid(), os.getegid(), os.getgroups()) == (0, 0, groups)

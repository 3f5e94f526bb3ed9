"""A queue run with only local recipients loads no module it does not use: the runner works
alone until its local workers fork (they inherit its modules), so every import there is time
in which one process delivers nothing."""

import os
import pwd
import subprocess
import sys
from pathlib import Path

from pymailtools.config import Config
from tests.conftest import need_root, script, write_toml
from tests.support import queue as support_queue

# What only a remote delivery, a |command, a deferral or a routing warning needs.
NOT_LOCAL = {"asyncio", "aiosmtplib", "dns", "email", "json", "logging", "random", "socket",
             "ipaddress", "subprocess", "selectors", "shutil", "signal", "threading",
             "pymailtools.smtp.nexthop", "pymailtools.qmgr.dispatch", "pymailtools.smtp.client"}


def test_local_queue_run_imports(tmp_path: Path, config_values: dict[str, object],
                                 system_user: pwd.struct_passwd,
                                 other_user: pwd.struct_passwd) -> None:
    need_root()
    values = {**config_values, "home_mailbox": "Maildir/"}
    cfg = Config(values)
    addresses = [f"{u.pw_name}@{d}" for u in (system_user, other_user)
                 for d in ("host.example.test", "localhost")]
    for i in range(40):  # enough for the local workers
        support_queue.queue(cfg, addresses[i % len(addresses)])
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYMAILTOOLS_")}
    env.update(HOME=str(tmp_path), PYMAILTOOLS_CONFIG=str(write_toml(tmp_path / "c.toml", values)))
    p = subprocess.run([sys.executable, "-X", "importtime", script("sendmail"), "-q"],
                       capture_output=True, env=env, timeout=120, stdin=subprocess.DEVNULL)
    assert p.returncode == 0, p.stderr
    assert support_queue.entries(cfg) == []
    modules = {line.split("|")[-1].strip()
               for line in p.stderr.decode().splitlines() if line.startswith("import time:")}
    assert "pymailtools.qmgr.runner" in modules
    loaded = modules | {m.split(".")[0] for m in modules}
    assert loaded & NOT_LOCAL == set()


def test_routing_warning_reaches_the_runners_log(tmp_path: Path, config_values: dict[str, object],
                                                 system_user: pwd.struct_passwd,
                                                 other_user: pwd.struct_passwd) -> None:
    # Python logging loads only with the first routing warning: that warning still goes to
    # the runner's log (here -v: stderr), as a warning, once.
    need_root()
    forward = Path(system_user.pw_dir) / ".forward"
    forward.write_text("|/usr/bin/true\n")
    os.chown(forward, other_user.pw_uid, other_user.pw_gid)
    cfg = Config(config_values)
    support_queue.queue(cfg, system_user.pw_name)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYMAILTOOLS_")}
    env.update(HOME=str(tmp_path),
               PYMAILTOOLS_CONFIG=str(write_toml(tmp_path / "c.toml", config_values)))
    p = subprocess.run([script("sendmail"), "-q", "-v"], capture_output=True, env=env,
                       timeout=120, stdin=subprocess.DEVNULL)
    assert p.returncode == 0, p.stderr
    warnings = [line for line in p.stderr.decode().splitlines() if "bad owner" in line]
    assert len(warnings) == 1 and warnings[0].startswith("sendmail: warning: "), p.stderr
    assert support_queue.entries(cfg) == []

"""sendmail's submission path stays light: no asyncio, aiosmtplib, dnspython, rich, email..."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import script

# Every pymailtools module a submission loads, by mode: each one costs ~0.4 M instructions of
# the import machinery before its own code (a third of what a submission spends above Python's
# start-up goes to loading these). A module more here should be one the submission cannot do
# without.
QUEUE_PATH = {"pymailtools", "pymailtools.errors", "pymailtools.address", "pymailtools.config",
              "pymailtools.fileio", "pymailtools.cli", "pymailtools.cli.common",
              "pymailtools.cli.sendmail", "pymailtools.queue", "pymailtools.queue.ids",
              "pymailtools.queue.envelope", "pymailtools.queue.format",
              "pymailtools.queue.summaries", "pymailtools.queue.intake", "pymailtools.submit",
              "pymailtools.submit.submission"}
WAKE_PATH = QUEUE_PATH | {"pymailtools.qmgr", "pymailtools.qmgr.trigger"}

FORBIDDEN = {"asyncio", "aiosmtplib", "dns", "rich", "click", "email", "json", "re", "typing",
             "dataclasses", "subprocess", "socket", "logging", "tomllib", "__future__"}


@pytest.mark.parametrize("mode", ["queue", "background"])
def test_submission_imports(tmp_path: Path, mode: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYMAILTOOLS_")}
    env.update(HOME=str(tmp_path), XDG_CONFIG_HOME=str(tmp_path / "cfg"),
               PYMAILTOOLS_QUEUE_DIRECTORY=str(tmp_path / "queue"),
               PYMAILTOOLS_MAIL_SPOOL_DIRECTORY=str(tmp_path / "spool"),
               PYMAILTOOLS_SYSLOG="no", PYMAILTOOLS_DELIVERY_MODE=mode,
               # the background runner resolves example.test: loopback only, a closed port
               PYMAILTOOLS_DNS_NAMESERVERS="127.0.0.1:9", PYMAILTOOLS_DNS_TIMEOUT="1")
    if Path("/etc/pymailtools/config.toml").exists():
        pytest.skip("a system configuration file exists; its parser would load tomllib")
    p = subprocess.run([sys.executable, "-X", "importtime", script("sendmail"), "-i",
                        "someone@example.test"], input=b"Subject: t\n\nbody\n",
                       capture_output=True, env=env, timeout=60)
    assert p.returncode == 0, p.stderr
    loaded = {line.split("|")[-1].strip().split(".")[0]
              for line in p.stderr.decode().splitlines() if line.startswith("import time:")}
    assert "pymailtools" in loaded
    assert loaded & FORBIDDEN == set()
    # no rewriting key set: the rewriting module and the lookup tables stay unloaded
    modules = {line.split("|")[-1].strip()
               for line in p.stderr.decode().splitlines() if line.startswith("import time:")}
    assert modules & {"pymailtools.rewrite", "pymailtools.tables"} == set()
    # a submission writes through queue.intake and the index's appender: the rest of the
    # queue store and the index's reader stay unloaded
    assert modules & {"pymailtools.queue.store", "pymailtools.queue.index"} == set()
    # nothing else of the package: the SMTP client's errors live in its package, the runner
    # lock in queue.intake
    ours = {m for m in modules if m.split(".")[0] == "pymailtools"}
    assert ours == (QUEUE_PATH if mode == "queue" else WAKE_PATH)

"""mail with s-nail's account variables: the same command line through s-nail and through our
mail must deliver (aiosmtpd with trustme TLS and AUTH PLAIN/LOGIN on loopback); the password
chain, .netrc, ~/.mailrc accounts, record= copies, and certificate refusal."""

import importlib.util
import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import trustme
from aiosmtpd.smtp import AuthResult

from tests.conftest import need_tool, write_toml
from tests.support.mail import mail_env, mbox_messages, run_mail
from tests.support.net import TIMEOUT, free_port
from tests.support.smtp import Authenticator, Certs, Handler, Server

USER = "me@provider.test"
URL_USER = "me%40provider.test"
PASSWORD = "Pw 7$x#!q"  # noqa: S105 - a test credential: space, $, # and ! on purpose
BODY = b"the body\n"


class Peer:
    """aiosmtpd on 127.0.0.1 with the trustme certificate (localhost, 127.0.0.1) and AUTH."""

    def __init__(self, certs: Certs, *, implicit: bool, mechanisms: tuple[str, ...] = (
            "PLAIN", "LOGIN")) -> None:
        self.port = free_port()
        self.auth = Authenticator(USER, PASSWORD)
        self.handler = Handler("provider")
        tls: dict[str, Any] = ({"ssl_context": certs.server_context(), "auth_require_tls": False}
                               if implicit else {"tls_context": certs.server_context(),
                                                 "auth_require_tls": True})
        excluded = [m for m in ("PLAIN", "LOGIN") if m not in mechanisms]
        self.server = Server("127.0.0.1", self.port, self.handler, authenticator=self.auth,
                             auth_exclude_mechanism=excluded, **tls)

    @property
    def delivered(self) -> list[list[str]]:
        return [m.rcpts for m in self.handler.messages]

    @property
    def sent_mail(self) -> bool:
        return any(c.startswith("MAIL") for c in self.handler.commands)


@pytest.fixture
def certs(tmp_path: Path) -> Certs:
    return Certs(tmp_path)


@pytest.fixture
def peers(certs: Certs) -> Iterator[list[Peer]]:
    started: list[Peer] = []
    yield started
    for p in started:
        p.server.stop()


def peer(peers: list[Peer], certs: Certs, **kwargs: Any) -> Peer:
    p = Peer(certs, **kwargs)
    peers.append(p)
    return p


@pytest.fixture
def home(tmp_path: Path) -> Path:
    h = tmp_path / "home"
    h.mkdir()
    return h


@pytest.fixture
def env(config_file: Path, home: Path) -> dict[str, str]:
    # NETRC and MAILRC named: s-nail takes ~ from the password database, not $HOME
    return mail_env(config_file, home, DEAD=str(home / "dead.letter"),
                    NETRC=str(home / ".netrc"), MAILRC=str(home / ".mailrc"))


def ours(env: dict[str, str], *args: str, rcpt: str = "ours@example.test") -> Any:
    return run_mail(env, *args, "-s", "account test", rcpt, input=BODY)


def snail(env: dict[str, str], *args: str, rcpt: str = "snail@example.test") -> Any:
    binary = need_tool("s-nail", "s-nail")
    return subprocess.run([binary, "-n", "-S", "v15-compat", "-S", "sendwait", *args,
                           "-s", "account test", rcpt], input=BODY, capture_output=True,
                          env=env, timeout=TIMEOUT)


def smtps(p: Peer, certs: Certs) -> list[str]:
    """The account on ``p`` over implicit TLS, its certificate verified with the test CA."""
    return ["-S", f"mta=smtps://{URL_USER}@localhost:{p.port}",
            "-S", f"tls-ca-file={certs.ca_file}"]


def no_secret(*results: Any) -> None:
    for r in results:
        assert PASSWORD.encode() not in r.stdout + r.stderr


def one_line(stderr: bytes) -> str:
    lines = stderr.decode().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mail: "), stderr
    return lines[0]


def both_deliver(env: dict[str, str], p: Peer, *args: str) -> None:
    """The same arguments make s-nail and our mail deliver, each with a good AUTH."""
    r_snail = snail(env, *args)
    assert r_snail.returncode == 0, r_snail.stderr
    r_ours = ours(env, *args)
    assert r_ours.returncode == 0, r_ours.stderr
    assert p.delivered == [["snail@example.test"], ["ours@example.test"]]
    assert [ok for _, ok in p.auth.attempts] == [True, True]
    no_secret(r_snail, r_ours)


# --- the differential: the same command line ----------------------------------------------------

@pytest.mark.parametrize("form", ["smtps", "submissions", "starttls", "submission", "login",
                                  "user-variable", "no-defaults"])
def test_the_same_command_line_sends_through_s_nail_and_mail(
        env: dict[str, str], peers: list[Peer], certs: Certs, form: str) -> None:
    implicit = form in ("smtps", "submissions", "no-defaults")
    p = peer(peers, certs, implicit=implicit,
             mechanisms=("LOGIN",) if form == "login" else ("PLAIN", "LOGIN"))
    hp = f"localhost:{p.port}"
    ca = ["-S", f"tls-ca-file={certs.ca_file}"]
    args = {
        "smtps": ["-S", f"mta=smtps://{URL_USER}@{hp}", "-S", f"password={PASSWORD}"],
        "submissions": ["-S", f"mta=submissions://{URL_USER}@{hp}",
                        "-S", f"password-{USER}@{hp}={PASSWORD}"],
        "starttls": ["-S", f"mta=smtp://{URL_USER}@{hp}", "-S", "smtp-use-starttls",
                     "-S", f"password-{hp}={PASSWORD}"],
        "submission": ["-S", f"mta=submission://{URL_USER}@{hp}", "-S", "smtp-use-starttls",
                       "-S", f"password={PASSWORD}"],
        "login": ["-S", f"mta=smtp://{URL_USER}@{hp}", "-S", "smtp-use-starttls",
                  "-S", "smtp-auth=login", "-S", f"password={PASSWORD}"],
        "user-variable": ["-S", f"mta=smtp://{hp}", "-S", "smtp-use-starttls",
                          "-S", f"user={USER}", "-S", f"password-{USER}@{hp}={PASSWORD}"],
        "no-defaults": ["-S", f"mta=smtps://{URL_USER}@{hp}", "-S", f"password={PASSWORD}",
                        "-S", "tls-ca-no-defaults"],
    }[form]
    both_deliver(env, p, *args, *ca)
    if form == "login":
        assert [m for m, _ in p.auth.attempts] == ["LOGIN", "LOGIN"]
    else:
        assert [m for m, _ in p.auth.attempts] == ["PLAIN", "PLAIN"]


@pytest.mark.parametrize("name, snail_too", [
    (f"password-{USER}@localhost:PORT", True),
    (f"password-{USER}@localhost", False),  # s-nail's HOST includes the URL's port
    ("password-localhost:PORT", True),
    ("password-localhost", False),
    ("password", True),
])
def test_each_step_of_the_password_chain(env: dict[str, str], peers: list[Peer],
                                         certs: Certs, name: str, snail_too: bool) -> None:
    p = peer(peers, certs, implicit=True)
    name = name.replace("PORT", str(p.port))
    args = [*smtps(p, certs), "-S", f"{name}={PASSWORD}", "-S", "password-other.test=wrong"]
    if snail_too:
        both_deliver(env, p, *args)
    else:
        r = ours(env, *args)
        assert r.returncode == 0, r.stderr
        assert p.delivered == [["ours@example.test"]] and p.auth.attempts == [("PLAIN", True)]
        no_secret(r)


def test_a_wrong_password_in_a_more_specific_name_wins(env: dict[str, str], peers: list[Peer],
                                                        certs: Certs) -> None:
    p = peer(peers, certs, implicit=True)
    r = ours(env, *smtps(p, certs), "-S", f"password={PASSWORD}",
             "-S", f"password-localhost:{p.port}=wrong")
    assert r.returncode == 69, r.stderr
    assert "authentication failed" in one_line(r.stderr)
    assert p.auth.attempts == [("PLAIN", False)] and p.delivered == []


# --- .netrc --------------------------------------------------------------------------------------

def test_netrc_gives_user_and_password(env: dict[str, str], home: Path, peers: list[Peer],
                                       certs: Certs) -> None:
    p = peer(peers, certs, implicit=True)
    netrc = home / ".netrc"
    netrc.write_text(f'machine other.test login x password y\n'
                     f'machine localhost login {USER} password "{PASSWORD}"\n')
    netrc.chmod(0o600)
    both_deliver(env, p, "-S", f"mta=smtps://localhost:{p.port}", "-S", "netrc-lookup",
                 "-S", f"tls-ca-file={certs.ca_file}")


def test_a_netrc_others_can_read_is_refused(env: dict[str, str], home: Path,
                                            peers: list[Peer], certs: Certs) -> None:
    p = peer(peers, certs, implicit=True)
    netrc = home / ".netrc"
    netrc.write_text(f'machine localhost login {USER} password "{PASSWORD}"\n')
    netrc.chmod(0o644)
    args = [*smtps(p, certs), "-S", "netrc-lookup"]
    assert snail(env, *args).returncode != 0  # s-nail refuses it too
    r = ours(env, *args)
    assert r.returncode == 78, r.stderr
    line = one_line(r.stderr)
    assert str(netrc) in line and "chmod 600" in line
    assert p.delivered == [] and not p.sent_mail
    no_secret(r)


# --- TLS: the server's identity ------------------------------------------------------------------

@pytest.mark.parametrize("implicit", [True, False])
def test_a_certificate_from_another_ca_is_refused_before_the_password(
        env: dict[str, str], peers: list[Peer], certs: Certs, tmp_path: Path,
        implicit: bool) -> None:
    p = peer(peers, certs, implicit=implicit)
    other = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other))
    scheme = "smtps" if implicit else "smtp"
    args = ["-S", f"mta={scheme}://{URL_USER}@localhost:{p.port}", "-S", f"password={PASSWORD}",
            "-S", f"tls-ca-file={other}", "-S", "tls-ca-no-defaults",
            *([] if implicit else ["-S", "smtp-use-starttls"])]
    assert snail(env, *args).returncode != 0
    r = ours(env, *args)
    assert r.returncode == 69, r.stderr
    assert "certificate" in one_line(r.stderr).lower()
    assert p.auth.attempts == [] and p.delivered == [] and not p.sent_mail
    no_secret(r)


def test_certificates_are_checked_by_default_when_a_password_is_sent(
        env: dict[str, str], peers: list[Peer], certs: Certs) -> None:
    """No tls-ca-file: the system's CAs do not know the test CA, so nothing is sent."""
    p = peer(peers, certs, implicit=True)
    r = ours(env, "-S", f"mta=smtps://{URL_USER}@localhost:{p.port}",
             "-S", f"password={PASSWORD}")
    assert r.returncode == 69, r.stderr
    assert "certificate" in one_line(r.stderr).lower()
    assert p.auth.attempts == [] and not p.sent_mail


@pytest.mark.parametrize("value", ["ignore", "warn"])
def test_tls_verify_ignore_sends_and_says_so_loudly(env: dict[str, str], peers: list[Peer],
                                                    certs: Certs, value: str) -> None:
    p = peer(peers, certs, implicit=True)
    args = ["-S", f"mta=smtps://{URL_USER}@localhost:{p.port}", "-S", f"password={PASSWORD}",
            "-S", f"tls-verify={value}"]
    both_deliver(env, p, *args)
    r = ours(env, *args, rcpt="again@example.test")
    assert r.returncode == 0
    warning = one_line(r.stderr)
    assert f"tls-verify={value}" in warning and "NOT checked" in warning


def test_no_tls_offered_while_a_password_would_be_sent(env: dict[str, str],
                                                       peers: list[Peer]) -> None:
    port = free_port()
    auth = Authenticator(USER, PASSWORD)
    handler = Handler("plain")
    server = Server("127.0.0.1", port, handler, authenticator=auth, auth_require_tls=False)
    try:
        r = ours(env, "-S", f"mta=smtp://{URL_USER}@localhost:{port}",
                 "-S", f"password={PASSWORD}")
    finally:
        server.stop()
    assert r.returncode == 69, r.stderr
    assert "TLS is required, but was not offered" in one_line(r.stderr)
    assert auth.attempts == [] and handler.messages == []
    no_secret(r)


# --- bad input -----------------------------------------------------------------------------------

def test_a_password_in_the_url_works_but_warns_about_the_process_list(
        env: dict[str, str], peers: list[Peer], certs: Certs) -> None:
    p = peer(peers, certs, implicit=True)
    secret = PASSWORD.replace(" ", "%20").replace("$", "%24").replace("#", "%23")
    r = ours(env, "-S", f"mta=smtps://{URL_USER}:{secret}@localhost:{p.port}",
             "-S", f"tls-ca-file={certs.ca_file}")
    assert r.returncode == 0, r.stderr
    warning = one_line(r.stderr)
    assert "process list" in warning and secret not in warning
    assert p.auth.attempts == [("PLAIN", True)]


@pytest.mark.parametrize("args, code, text", [
    (["-S", "mta=lmtp://localhost:24"], 64, "unsupported mta"),
    (["-S", "mta=smtps://localhost", "-S", "smtp-auth=cram-md5"], 64, "smtp-auth"),
    (["-S", f"mta=smtps://{URL_USER}@localhost"], 64, f"no password for {USER}"),
    (["-A", "nosuch"], 78, "account nosuch is not defined"),
    (["-:", "x"], 64, "-:"),
])
def test_bad_settings_are_one_line(env: dict[str, str], args: list[str], code: int,
                                   text: str) -> None:
    r = ours(env, *args)
    assert r.returncode == code, r.stderr
    assert text in r.stderr.decode().splitlines()[0]
    assert "Traceback" not in r.stderr.decode()


# --- resource files ------------------------------------------------------------------------------

def mailrc(home: Path, text: str) -> Path:
    path = home / ".mailrc"
    path.write_text(text)
    path.chmod(0o600)
    return path


def test_an_account_block_chosen_with_A(env: dict[str, str], home: Path, peers: list[Peer],
                                        certs: Certs) -> None:
    p = peer(peers, certs, implicit=False)
    mailrc(home, f"""# s-nail resource file
set v15-compat
alias team a@example.test b@example.test
ignore received
retain date from to subject
set from="Me <{USER}>"
account provider {{
  set mta=smtp://{URL_USER}@localhost:{p.port} smtp-use-starttls \\
      tls-ca-file={certs.ca_file}
  set password-{USER}@localhost:{p.port}='{PASSWORD}'
}}
""")
    both_deliver(env, p, "-A", "provider")
    assert b"From: Me <me@provider.test>" in p.handler.messages[1].content
    r = ours(env, rcpt="queued@example.test")  # no -A: no mta, the local queue takes it
    assert r.returncode == 0, r.stderr
    assert len(p.delivered) == 2


def test_command_line_settings_win_over_the_files(env: dict[str, str], home: Path,
                                                  peers: list[Peer], certs: Certs) -> None:
    p = peer(peers, certs, implicit=True)
    mailrc(home, f"set password=wrong tls-verify=ignore\n"
                 f"set mta=smtps://{URL_USER}@localhost:{p.port}\n"
                 f"unset tls-ca-file\n")
    r = ours(env, "-S", f"password={PASSWORD}", "-S", f"tls-ca-file={certs.ca_file}",
             "-S", "notls-verify")
    assert r.returncode == 0, r.stderr
    assert r.stderr == b""  # tls-verify unset: verified, no warning
    assert p.auth.attempts == [("PLAIN", True)]


def test_the_user_file_can_be_skipped(env: dict[str, str], home: Path) -> None:
    mailrc(home, "set mta=lmtp://nowhere\n")
    assert ours(env).returncode == 64
    assert ours(env, "-:", "/").returncode == 0
    assert ours(dict(env, MAILRC="/dev/null")).returncode == 0


# --- record= -------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["mbox", "maildir"])
def test_record_keeps_a_copy_of_what_was_sent(env: dict[str, str], home: Path,
                                              peers: list[Peer], certs: Certs,
                                              kind: str) -> None:
    p = peer(peers, certs, implicit=True)
    record = "+sent" if kind == "mbox" else "~/Sent/"
    r = ours(env, *smtps(p, certs), "-S", f"password={PASSWORD}", "-S", f"folder={home}",
             "-S", f"record={record}")
    assert r.returncode == 0, r.stderr
    assert len(p.delivered) == 1
    sent = p.handler.messages[0].content
    if kind == "mbox":
        (copy,) = mbox_messages(home / "sent")
        assert copy["Subject"] == "account test" and copy.get_payload() == BODY.decode()
        assert (home / "sent").read_bytes().startswith(b"From ")
    else:
        (name,) = os.listdir(home / "Sent" / "new")
        copy_bytes = (home / "Sent" / "new" / name).read_bytes()
        assert copy_bytes.endswith(sent.replace(b"\r\n", b"\n"))


def test_record_for_the_local_queue_too(env: dict[str, str], home: Path) -> None:
    r = ours(env, "-S", f"record={home / 'sent'}")
    assert r.returncode == 0, r.stderr
    assert [m["To"] for m in mbox_messages(home / "sent")] == ["ours@example.test"]


def test_an_unwritable_record_sends_nothing(env: dict[str, str], home: Path,
                                            peers: list[Peer], certs: Certs) -> None:
    p = peer(peers, certs, implicit=True)
    r = ours(env, *smtps(p, certs), "-S", f"password={PASSWORD}",
             "-S", f"record={home / 'no' / 'such' / 'dir' / 'sent'}")
    assert r.returncode == 73, r.stderr
    assert "not sent" in one_line(r.stderr)
    assert not p.sent_mail


# --- the client's password and token commands (their behaviour lives in smtp/) -------------------

needs_secret_commands = pytest.mark.skipif(
    importlib.util.find_spec("pymailtools.smtp.secret") is None,
    reason="the SMTP client does not run password commands yet (smtp/secret.py)")


@needs_secret_commands
def test_password_from_a_command(env: dict[str, str], home: Path, peers: list[Peer],
                                 certs: Certs) -> None:
    p = peer(peers, certs, implicit=True)
    script = home / "pw.sh"
    script.write_text(f"#!/bin/sh\nprintf '%s\\n' '{PASSWORD}'\n")
    script.chmod(0o700)
    r = ours(env, *smtps(p, certs), "-S", f"smtp-auth-password-command={script}")
    assert r.returncode == 0, r.stderr
    assert p.auth.attempts == [("PLAIN", True)]
    no_secret(r)


class TokenHandler(Handler):
    """Accepts XOAUTH2 with one access token (aiosmtpd offers a handler's auth_* methods)."""

    def __init__(self, token: str) -> None:
        super().__init__("oauth")
        self.expected = f"user={USER}\x01auth=Bearer {token}\x01\x01".encode()
        self.tokens: list[bool] = []

    async def auth_XOAUTH2(self, server: Any, args: list[str]) -> AuthResult:
        import base64

        if len(args) > 1:
            data = base64.b64decode(args[1])
        else:
            data = await server.challenge_auth("", encode_to_b64=False)
        ok = data == self.expected
        self.tokens.append(ok)
        return AuthResult(success=ok, handled=False)


@contextmanager
def token_peer(home: Path, certs: Certs, token: str) -> Iterator[tuple[TokenHandler, int, Path]]:
    """aiosmtpd over implicit TLS taking XOAUTH2 with ``token``, its port, and a command that
    prints the token."""
    handler = TokenHandler(token)
    port = free_port()
    server = Server("127.0.0.1", port, handler, ssl_context=certs.server_context(),
                    auth_require_tls=False, authenticator=Authenticator(USER, PASSWORD))
    script = home / "token.sh"
    script.write_text(f"#!/bin/sh\necho {token}\n")
    script.chmod(0o700)
    try:
        yield handler, port, script
    finally:
        server.stop()


@needs_secret_commands
def test_xoauth2_with_a_token_command(env: dict[str, str], home: Path, certs: Certs) -> None:
    token = "ya29.a0-test-token"  # long tokens are the client's business (tests/smtp)
    with token_peer(home, certs, token) as (handler, port, script):
        r = ours(env, "-S", f"mta=smtps://{URL_USER}@localhost:{port}",
                 "-S", f"tls-ca-file={certs.ca_file}", "-S", "smtp-auth=xoauth2",
                 "-S", f"smtp-auth-oauth2-token-command={script}")
    assert r.returncode == 0, r.stderr
    assert handler.tokens == [True] and len(handler.messages) == 1
    assert token.encode() not in r.stdout + r.stderr


@needs_secret_commands
def test_the_site_token_command_is_never_offered_to_a_server_the_user_names(
        env: dict[str, str], home: Path, certs: Certs, config_values: dict[str, object],
        tmp_path: Path) -> None:
    """smtp_sasl_oauth2_token_command is the relayhost's account, like smtp_sasl_username:
    mail -S mta= to another server runs no token command and sends no AUTH."""
    with token_peer(home, certs, "ya29.a0-site-token") as (handler, port, script):
        conf = write_toml(tmp_path / "site.toml", {
            **config_values, "smtp_sasl_oauth2_token_command": str(script)})
        r = ours(dict(env, PYMAILTOOLS_CONFIG=str(conf)), "-S",
                 f"mta=smtps://localhost:{port}", "-S", f"tls-ca-file={certs.ca_file}")
    assert r.returncode == 0, r.stderr
    assert handler.tokens == [] and len(handler.messages) == 1
    assert not any(c.upper().startswith("AUTH") for c in handler.commands)

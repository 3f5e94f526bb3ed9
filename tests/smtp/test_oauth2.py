"""pymailtools-oauth2 against a real OAuth2 server on loopback (HTTPS, trustme): the device
flow end to end (pending, slow_down, approval), the refresh flow with a rotated refresh
token, refusals and a dead server as one line and a sysexits code, the store 0600."""

import json
import os
import stat
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import script
from tests.support.net import free_port
from tests.support.oauth import CLIENT_ID, USER_CODE, OAuthServer

SECRET = "client-secret-s3cr3t"


def oauth2(tmp_path: Path, *args: str, env: dict[str, str] | None = None,
           ) -> subprocess.CompletedProcess[str]:
    e = dict(os.environ, XDG_CONFIG_HOME=str(tmp_path / "config"))
    e.update(env or {})
    return subprocess.run([script("pymailtools-oauth2"), *args], capture_output=True,
                          text=True, timeout=60, env=e, stdin=subprocess.DEVNULL)


def authorize(tmp_path: Path, server: OAuthServer, *extra: str,
              ) -> subprocess.CompletedProcess[str]:
    secret = tmp_path / "secret"
    secret.write_text(SECRET + "\n")
    return oauth2(tmp_path, "authorize", "--account", "work", "--provider", "custom",
                  "--client-id", CLIENT_ID, "--client-secret-command", f"cat {secret}",
                  "--device-endpoint", f"{server.url}/device",
                  "--token-endpoint", f"{server.url}/token",
                  "--scope", "https://mail.example.test/", "--ca-file", str(server.ca_file),
                  *extra)


def store(tmp_path: Path) -> Path:
    return tmp_path / "config" / "pymailtools" / "oauth2" / "work.json"


def no_secret_in(text: str) -> None:
    for secret in (SECRET, "access-", "refresh-"):
        assert secret not in text, text


def test_device_flow_pending_slow_down_then_approved(tmp_path: Path) -> None:
    with OAuthServer(tmp_path, interval=0, client_secret=SECRET,
                     polls=["authorization_pending", "slow_down", "ok"]) as server:
        p = authorize(tmp_path, server)
    assert p.returncode == 0, p.stderr
    assert f"open {server.url}/activate and enter the code {USER_CODE}" in p.stdout
    assert p.stderr == ""
    polls = [(t, form) for t, path, form in server.requests if path == "/token"]
    assert len(polls) == 3
    # slow_down adds five seconds to the interval (RFC 8628 3.5)
    assert polls[2][0] - polls[1][0] >= 4.9
    assert all(f["client_secret"] == SECRET and f["device_code"] for _, f in polls)
    path = store(tmp_path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    saved = json.loads(path.read_text())
    assert saved["refresh_token"] == "refresh-2" and saved["access_token"] == "access-1"
    assert SECRET not in path.read_text()  # the command is kept, not the secret
    # a fresh access token is printed as it is, without asking the server
    before = len(server.requests)
    p = oauth2(tmp_path, "token", "--account", "work")
    assert p.returncode == 0 and p.stdout == "access-1\n" and p.stderr == ""
    assert len(server.requests) == before


def test_expired_access_token_is_refreshed_and_rotated(tmp_path: Path) -> None:
    with OAuthServer(tmp_path, client_secret=SECRET) as server:
        assert authorize(tmp_path, server).returncode == 0
        path = store(tmp_path)
        saved = json.loads(path.read_text())
        saved["expires_at"] = time.time() - 10
        path.write_text(json.dumps(saved))
        p = oauth2(tmp_path, "token", "--account", "work", "--json")
        assert p.returncode == 0, p.stderr
        answer = json.loads(p.stdout)
        assert answer["access_token"] == "access-2" and 3500 < answer["expires_in"] <= 3599
        (_, last, form) = server.requests[-1]
        assert last == "/token" and form["grant_type"] == "refresh_token"
        assert form["refresh_token"] == "refresh-2" and form["client_secret"] == SECRET
        saved = json.loads(path.read_text())
        assert saved["refresh_token"] == "refresh-3"  # the rotated one is kept
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        no_secret_in(p.stderr)
        # the old refresh token is now refused: a clear line, exit 77, no token shown
        saved["expires_at"], saved["refresh_token"] = 0, "refresh-2"
        path.write_text(json.dumps(saved))
        path.chmod(0o600)
        p = oauth2(tmp_path, "token", "--account", "work")
    assert p.returncode == 77 and p.stdout == ""
    assert p.stderr == ("pymailtools-oauth2: the refresh token was refused (invalid_grant: "
                        "token revoked or rotated); run pymailtools-oauth2 authorize again\n")


@pytest.mark.parametrize(("step", "code", "line"), [
    ("access_denied", 77, "sign-in refused (access_denied: the test says access_denied)"),
    ("expired_token", 75, "the device code expired (expired_token: the test says "
                          "expired_token); run authorize again"),
])
def test_refusals_are_one_line(tmp_path: Path, step: str, code: int, line: str) -> None:
    with OAuthServer(tmp_path, polls=["authorization_pending", step]) as server:
        p = authorize(tmp_path, server)
    assert p.returncode == code
    assert p.stderr == f"pymailtools-oauth2: {line}\n"
    assert not store(tmp_path).exists()


def test_server_down_and_untrusted_certificate(tmp_path: Path) -> None:
    port = free_port()
    secret = tmp_path / "secret"
    secret.write_text("x\n")
    p = oauth2(tmp_path, "authorize", "--account", "work", "--provider", "custom",
               "--client-id", CLIENT_ID, "--device-endpoint", f"https://127.0.0.1:{port}/d",
               "--token-endpoint", f"https://127.0.0.1:{port}/t", "--scope", "s")
    assert p.returncode == 69
    assert p.stderr == f"pymailtools-oauth2: cannot reach 127.0.0.1:{port}: Connection refused\n"
    with OAuthServer(tmp_path) as server:
        p = oauth2(tmp_path, "authorize", "--account", "work", "--provider", "custom",
                   "--client-id", CLIENT_ID, "--device-endpoint", f"{server.url}/device",
                   "--token-endpoint", f"{server.url}/token", "--scope", "s")
        assert p.returncode == 69 and "CERTIFICATE_VERIFY_FAILED" in p.stderr
        assert p.stderr.count("\n") == 1 and server.requests == []
        # SSL_CERT_FILE trusts it as well as --ca-file does
        p = oauth2(tmp_path, "authorize", "--account", "work", "--provider", "custom",
                   "--client-id", CLIENT_ID, "--device-endpoint", f"{server.url}/device",
                   "--token-endpoint", f"{server.url}/token", "--scope", "s",
                   env={"SSL_CERT_FILE": str(server.ca_file)})
        assert p.returncode == 0, p.stderr


def test_store_with_loose_mode_is_refused(tmp_path: Path) -> None:
    with OAuthServer(tmp_path) as server:
        assert authorize(tmp_path, server).returncode == 0
    path = store(tmp_path)
    path.chmod(0o644)
    p = oauth2(tmp_path, "token", "--account", "work")
    assert p.returncode == 77 and p.stdout == ""
    assert p.stderr == (f"pymailtools-oauth2: {path}: mode 0644 gives group or others access "
                        "(chmod 600)\n")


def test_usage_errors(tmp_path: Path) -> None:
    p = oauth2(tmp_path, "token")
    assert p.returncode == 64 and p.stderr.count("\n") == 1 and "--account" in p.stderr
    p = oauth2(tmp_path, "authorize", "--account", "../x", "--provider", "google",
               "--client-id", "c")
    assert p.returncode == 64 and "--account" in p.stderr
    p = oauth2(tmp_path, "authorize", "--account", "a", "--provider", "custom",
               "--client-id", "c", "--device-endpoint", "http://127.0.0.1:1/d",
               "--token-endpoint", "https://127.0.0.1:1/t", "--scope", "s")
    assert p.returncode == 64 and "must be an https:// URL" in p.stderr
    p = oauth2(tmp_path, "token", "--account", "nobody")
    assert p.returncode == 78 and "run pymailtools-oauth2 authorize first" in p.stderr


def test_presets() -> None:
    from pymailtools.smtp import oauth2 as lib

    g = lib.provider("google")
    assert (g.device_endpoint, g.token_endpoint, g.scope) == (
        "https://oauth2.googleapis.com/device/code", "https://oauth2.googleapis.com/token",
        "https://mail.google.com/")
    m = lib.provider("microsoft", tenant="contoso.onmicrosoft.com")
    assert m.device_endpoint == ("https://login.microsoftonline.com/contoso.onmicrosoft.com/"
                                 "oauth2/v2.0/devicecode")
    assert m.token_endpoint.endswith("/contoso.onmicrosoft.com/oauth2/v2.0/token")
    assert m.scope.split() == ["https://outlook.office.com/SMTP.Send",
                               "https://outlook.office.com/IMAP.AccessAsUser.All",
                               "offline_access"]
    assert lib.provider("microsoft").device_endpoint.startswith(
        "https://login.microsoftonline.com/common/")


def test_an_accounts_printed_form_shows_no_token() -> None:
    from pymailtools.smtp import oauth2 as lib

    account = lib.Account("custom", "client", "https://d.test/", "https://t.test/", "scope",
                          False, refresh_token="RT-never-shown", access_token="AT-never-shown")
    assert "never-shown" not in repr(account) and "never-shown" not in str(account)

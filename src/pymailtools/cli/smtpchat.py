"""smtpchat: talk SMTP by hand like nc, or run one swaks-like test transaction."""

from __future__ import annotations

import getpass
import os
import re
import socket
import sys
from typing import Any

import click

from pymailtools import __version__
from pymailtools.address import check_envelope
from pymailtools.chat import compose, console, mra, status, target
from pymailtools.chat.session import Options, Session, needs_utf8
from pymailtools.chat.transcript import Transcript
from pymailtools.errors import AddressError

QUIT_AFTER = ["connect", "banner", "first-ehlo", "first-helo", "ehlo", "helo", "lhlo", "tls",
              "starttls", "auth", "mail", "from", "rcpt", "to", "data"]
AUTH_TYPES = {"PLAIN", "LOGIN", "CRAM-MD5"}
PASSWORD_ENV = "SMTPCHAT_AUTH_PASSWORD"


class UsageProblem(click.UsageError):
    """An option combination smtpchat cannot run (exit 1, as swaks)."""


def parse_timeout(text: str) -> float | None:
    """swaks' --timeout: seconds with an optional s/m/h unit; 0 means no timeout."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*", text)
    if not m:
        raise UsageProblem(f"bad --timeout {text!r} (examples: 30, 30s, 2m)")
    seconds = float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[m.group(2)]
    return seconds or None


def _addresses(values: tuple[str, ...]) -> list[str]:
    out = []
    for value in values:
        for part in value.split(","):
            part = part.strip().removeprefix("<").removesuffix(">")
            if not part:
                continue
            try:
                out.append(check_envelope(part, "recipient"))
            except AddressError as e:
                raise UsageProblem(str(e)) from None
    return out


def _sender(value: str | None, hostname: str) -> str:
    if value is None:
        user = os.environ.get("LOGNAME") or os.environ.get("USER") or "root"
        return f"{user}@{hostname}"
    value = value.strip()
    if value in ("", "<>"):
        return ""
    try:
        return check_envelope(value.removeprefix("<").removesuffix(">"), "sender")
    except AddressError as e:
        raise UsageProblem(str(e)) from None


def _check_mra(protocol: str, to: tuple[str, ...], mx: bool, quit_after: str | None) -> None:
    """Options that mean nothing to a POP3 or IMAP session are refused, not ignored."""
    name = "--" + protocol
    if to:
        raise UsageProblem(f"{name} sends no mail: --to is for SMTP")
    if mx:
        raise UsageProblem(f"{name} connects to the server given: --mx is for SMTP")
    if quit_after is not None and quit_after.lower() not in mra.QUIT_POINTS:
        raise UsageProblem(f"--quit-after {quit_after} is an SMTP step; with {name}: "
                           + ", ".join(mra.QUIT_POINTS))


def _tty() -> bool:
    try:
        return os.isatty(sys.stdin.fileno())
    except (OSError, ValueError):
        return False


def _ask(prompt: str, secret: bool, allowed: bool) -> str:
    """Ask on the terminal, or fail: smtpchat never prompts without one, so a script
    missing a password fails at once instead of hanging on its pipe."""
    if not allowed:
        raise UsageProblem(f"{prompt.rstrip(': ')} needed and there is no terminal to ask on "
                           f"(give it as an option{' or in ' + PASSWORD_ENV if secret else ''})")
    if secret:
        return getpass.getpass(prompt)
    return input(prompt)


@click.command(context_settings={"help_option_names": ["--help"], "max_content_width": 100})
@click.argument("host", required=False)
@click.argument("port", required=False)
@click.option("-s", "--server", metavar="HOST[:PORT]", help="Server to talk to (no MX lookup).")
@click.option("-p", "--port", "port_opt", metavar="PORT", help="Port (default 25; 465 with "
              "--tls-on-connect).")
@click.option("--pop3", "protocol", flag_value=mra.POP3, help="Talk POP3 instead of SMTP "
              "(port 110; 995 with TLS from the start).")
@click.option("--imap", "protocol", flag_value=mra.IMAP, help="Talk IMAP instead of SMTP "
              "(port 143; 993 with TLS from the start).")
@click.option("--command", "commands", multiple=True, metavar="TEXT", help="POP3/IMAP: a "
              "command to send after logging in (repeatable); runs a scripted session.")
@click.option("--mx", is_flag=True, help="Look up the MX hosts of the domain (HOST, or the last "
              "recipient's) and try each in turn.")
@click.option("--resolver", metavar="HOST[:PORT]", help="DNS server to ask for --mx lookups.")
@click.option("-4", "ipv4", is_flag=True, help="Connect over IPv4 only.")
@click.option("-6", "ipv6", is_flag=True, help="Connect over IPv6 only.")
@click.option("-li", "--local-interface", metavar="ADDR", help="Local address to connect from.")
@click.option("-t", "--to", multiple=True, metavar="ADDR[,ADDR...]",
              help="Envelope recipient(s); runs one scripted transaction.")
@click.option("-f", "--from", "sender", metavar="ADDR", help="Envelope sender; <> is the null "
              "sender (default $LOGNAME@host).")
@click.option("-h", "--ehlo", "--helo", "ehlo", metavar="NAME", help="EHLO name (default: this "
              "host's name).")
@click.option("--tls", "tls_required", is_flag=True, help="Require STARTTLS (exit 29 if it "
              "fails); POP3/IMAP on 995/993: TLS from the start.")
@click.option("-tlso", "--tls-optional", is_flag=True, help="Use STARTTLS if offered.")
@click.option("-tlsc", "--tls-on-connect", is_flag=True, help="TLS from the start (SMTPS, 465).")
@click.option("--tls-verify", is_flag=True, help="Verify the server certificate and name.")
@click.option("--tls-ca-path", metavar="FILE", help="CA certificates to verify with.")
@click.option("--tls-cert", metavar="FILE", help="Client certificate (PEM).")
@click.option("--tls-key", metavar="FILE", help="Client certificate key (PEM).")
@click.option("--tls-sni", metavar="NAME", help="Server name to send in the TLS handshake.")
@click.option("-a", "--auth", is_flag=False, flag_value="ANY", default=None, metavar="[TYPE,...]",
              help="Authenticate: PLAIN, LOGIN or CRAM-MD5 (default: the first offered).")
@click.option("-au", "--auth-user", metavar="USER", help="AUTH user name.")
@click.option("-ap", "--auth-password", metavar="PASSWORD",
              help=f"AUTH password (better: the {PASSWORD_ENV} environment variable).")
@click.option("--auth-plaintext", is_flag=True, help="Allow AUTH on a connection without TLS.")
@click.option("--show-secrets", is_flag=True,
              help="Show AUTH payloads (passwords, tokens) in the transcript instead of ********.")
@click.option("--header", "headers", multiple=True, metavar="'NAME: VALUE'",
              help="Set a header (replacing one of that name).")
@click.option("-ah", "--add-header", "add_headers", multiple=True, metavar="'NAME: VALUE'",
              help="Add a header.")
@click.option("--subject", metavar="TEXT", help="Subject (default: test DATE).")
@click.option("--body", metavar="TEXT|@FILE|-", help="Message body (default: This is a test "
              "mailing).")
@click.option("--attach", "attachments", multiple=True, metavar="FILE",
              help="Attach a file (multipart/mixed).")
@click.option("-d", "--data", metavar="TEXT|@FILE|FILE|-", help="The whole message as sent "
              "after DATA (tokens %FROM_ADDRESS% %TO_ADDRESS% %DATE% %MESSAGEID% %NEWLINE%).")
@click.option("-ndf", "--no-data-fixup", is_flag=True, help="Send --data bytes exactly: no line "
              "end fix-up, no tokens, no dot-stuffing.")
@click.option("--raw-line", "raw_lines", multiple=True, metavar="BYTES", help="Bytes (with \\r "
              "\\n \\xHH escapes) sent as is after the message, before the end of data.")
@click.option("--bare-lf", is_flag=True, help="End message lines with a bare LF.")
@click.option("--bare-cr", is_flag=True, help="End message lines with a bare CR.")
@click.option("-q", "--quit-after", type=click.Choice(QUIT_AFTER, case_sensitive=False),
              help="Stop the session after this step.")
@click.option("--pipeline", is_flag=True, help="Send MAIL, RCPT and DATA together (RFC 2920).")
@click.option("--chunking", is_flag=True, help="Send the message with BDAT (RFC 3030).")
@click.option("--chunk-size", type=click.IntRange(1, 1 << 30), default=65536, show_default=True,
              help="BDAT chunk size in bytes.")
@click.option("--smtputf8", is_flag=True, help="Send SMTPUTF8 (automatic for non-ASCII "
              "addresses).")
@click.option("--timeout", default="30s", show_default=True, metavar="TIME",
              help="Timeout per step (s, m, h); 0 for none.")
@click.option("-n", "--suppress-data", is_flag=True, help="Show a line count instead of the "
              "message.")
@click.option("--json", "as_json", is_flag=True, help="Print the transcript and outcome as JSON.")
@click.option("--no-prompt", is_flag=True, help="Never ask for anything, even on a terminal.")
@click.version_option(__version__, "--version", prog_name="smtpchat")
def command(**kw: Any) -> int:
    """Talk SMTP to a server by hand (interactive, or like nc when input is piped), or run one
    test transaction and show its transcript (with --to or --quit-after), like swaks."""
    return run(**kw)


def run(host: str | None, port: str | None, server: str | None, port_opt: str | None,
        protocol: str | None, commands: tuple[str, ...], mx: bool,
        resolver: str | None, ipv4: bool, ipv6: bool, local_interface: str | None,
        to: tuple[str, ...], sender: str | None, ehlo: str | None, tls_required: bool,
        tls_optional: bool, tls_on_connect: bool, tls_verify: bool, tls_ca_path: str | None,
        tls_cert: str | None, tls_key: str | None, tls_sni: str | None, auth: str | None,
        auth_user: str | None, auth_password: str | None, auth_plaintext: bool,
        show_secrets: bool, headers: tuple[str, ...], add_headers: tuple[str, ...],
        subject: str | None,
        body: str | None, attachments: tuple[str, ...], data: str | None,
        no_data_fixup: bool, raw_lines: tuple[str, ...], bare_lf: bool, bare_cr: bool,
        quit_after: str | None, pipeline: bool, chunking: bool, chunk_size: int,
        smtputf8: bool, timeout: str, suppress_data: bool, as_json: bool,
        no_prompt: bool) -> int:
    interactive_input = _tty()
    may_ask = interactive_input and not no_prompt
    if sum([tls_required, tls_optional, tls_on_connect]) > 1:
        raise UsageProblem("--tls, --tls-optional and --tls-on-connect exclude each other")
    if ipv4 and ipv6:
        raise UsageProblem("-4 and -6 exclude each other")
    if bare_lf and bare_cr:
        raise UsageProblem("--bare-lf and --bare-cr exclude each other")
    if server and host:
        raise UsageProblem("give the server either as HOST [PORT] or with --server, not both")
    if body is not None and data is not None:
        raise UsageProblem("--body and --data exclude each other")
    if protocol:
        _check_mra(protocol, to, mx, quit_after)
    elif commands:
        raise UsageProblem("--command needs --pop3 or --imap")
    hostname = socket.gethostname() or "localhost"
    recipients = _addresses(to)
    # POP3/IMAP: --auth alone is a test too (can this user log in?)
    scripted = (bool(recipients) or quit_after is not None or as_json or bool(commands)
                or (protocol is not None and auth is not None))
    opts = Options(
        family=socket.AF_INET if ipv4 else socket.AF_INET6 if ipv6 else 0,
        source=local_interface, resolver=resolver, to=recipients,
        sender=_sender(sender, hostname), ehlo=ehlo or hostname,
        tls="required" if tls_required else "optional" if tls_optional
        else "on-connect" if tls_on_connect else "",
        tls_verify=tls_verify, tls_ca=tls_ca_path, tls_cert=tls_cert, tls_key=tls_key,
        tls_sni=tls_sni, auth_user=auth_user or "", auth_plaintext=auth_plaintext,
        show_secrets=show_secrets,
        auth_password=auth_password or os.environ.get(PASSWORD_ENV, ""),
        quit_after=quit_after.lower() if quit_after else None, pipeline=pipeline,
        chunking=chunking, chunk_size=chunk_size, smtputf8=smtputf8,
        timeout=parse_timeout(timeout), suppress_data=suppress_data,
        line_ending=b"\n" if bare_lf else b"\r" if bare_cr else b"\r\n",
        raw_lines=[compose.unescape(r) for r in raw_lines], no_fixup=no_data_fixup,
        commands=list(commands),
    )
    try:
        given_port = port_opt or port
        opts.port = target.parse_port(given_port) if given_port else None
        if protocol:
            if opts.port is None:
                opts.port = mra.default_port(protocol, tls_on_connect)
            if tls_required and mra.implicit_tls_port(protocol, opts.port):
                opts.tls = "on-connect"  # 995 and 993 speak TLS from the first byte
        if server:
            opts.server = server
        elif host and not mx:
            opts.server = host if opts.port is None else f"[{host}]:{opts.port}"
        if host and mx:
            opts.mx_domain = host
        elif not server and not host:
            if not recipients:
                raise UsageProblem("no server: give HOST [PORT], --server or --mx with --to")
            opts.mx_domain = recipients[-1].rpartition("@")[2]
            if not opts.mx_domain:
                raise UsageProblem(f"no server, and {recipients[-1]} has no domain to look up")
    except ValueError as e:
        raise UsageProblem(str(e)) from None
    if opts.quit_after in ("mail", "from", "rcpt", "to", "data") and not recipients:
        raise UsageProblem(f"--quit-after {quit_after} needs --to")
    if auth is not None:
        wanted = [] if auth.upper() == "ANY" else [a.strip().upper() for a in auth.split(",")]
        known = mra.AUTH_TYPES[protocol] if protocol else AUTH_TYPES
        unknown = [a for a in wanted if a not in known]
        if unknown:
            raise UsageProblem(f"unknown --auth type {unknown[0]} ("
                               + ", ".join(sorted(known)) + ")")
        opts.auth = wanted
        if scripted and not opts.auth_user:
            opts.auth_user = _ask("Username: ", False, may_ask)
        if scripted and not opts.auth_password:
            opts.auth_password = _ask("Password: ", True, may_ask)

    colour = sys.stdout.isatty() and not os.environ.get("NO_COLOR") and not as_json
    if not scripted:
        if not host and not server:
            raise UsageProblem("interactive mode needs HOST [PORT] or --server")
        t = Transcript(colour=colour, hints=interactive_input)
        reader = console.terminal_reader() if interactive_input else console.stdin_reader()
        ask = None
        if may_ask:
            ask = getpass.getpass
        echo = interactive_input and not sys.stdout.isatty()
        if protocol:
            return mra.MraConsole(opts, t, interactive_input, reader, protocol, ask,
                                  echo_sent=echo).run()
        return console.Console(opts, t, interactive_input, reader, ask, echo_sent=echo).run()

    if protocol:
        t = Transcript(colour=colour, live=not as_json)
        mra_session = mra.MraSession(opts, t, protocol)
        code = mra_session.run()
        if as_json:
            sys.stdout.write(t.json(mra_session.outcome()) + "\n")
        return code

    stdin_used = False
    try:
        if data is not None:
            if data == "-" or data.startswith("@"):
                raw = compose.read_source(data)
                stdin_used = data == "-"
            elif os.path.isfile(data):
                raw = compose.read_source("@" + data)
            else:
                raw = data.replace("\\n", "\n").encode("utf-8")
            if not no_data_fixup:
                raw = compose.expand_tokens(raw, opts.sender, recipients, hostname)
            opts.message = raw
        else:
            body_bytes = None
            if body is not None:
                body_bytes = compose.read_source(body)
                stdin_used = body == "-"
            if stdin_used and "-" in attachments:
                raise UsageProblem("only one of --body and --attach can read standard input")
            opts.message = compose.compose(
                opts.sender, recipients, subject=subject, body=body_bytes, headers=list(headers),
                add_headers=list(add_headers), attachments=list(attachments), hostname=hostname,
                utf8=needs_utf8(opts))
    except compose.ComposeError as e:
        raise UsageProblem(str(e)) from None
    t = Transcript(colour=colour, live=not as_json)
    session = Session(opts, t)
    code = session.run()
    if as_json:
        sys.stdout.write(t.json(session.outcome()) + "\n")
    return code


def main(argv: list[str] | None = None) -> int:
    try:
        code = command.main(args=argv, prog_name="smtpchat", standalone_mode=False)
    except click.exceptions.Exit as e:
        return e.exit_code
    except click.exceptions.Abort:
        sys.stderr.write("\nsmtpchat: interrupted\n")
        return status.INTERRUPTED
    except click.ClickException as e:
        sys.stderr.write(f"smtpchat: {e.format_message()}\n")
        return status.USAGE
    except KeyboardInterrupt:
        sys.stderr.write("\nsmtpchat: interrupted\n")
        return status.INTERRUPTED
    return code if isinstance(code, int) else status.OK


if __name__ == "__main__":
    sys.exit(main())

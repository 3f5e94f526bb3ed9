"""smtpchat's exit codes: swaks' numbers and meanings, so swaks users' scripts keep working."""

OK = 0
USAGE = 1  # option parsing error
CONNECT = 2  # cannot connect (also: no address to connect to)
CONNECTION_LOST = 6  # the server closed the connection, or stopped answering, mid-session
MISSING_MODULE = 10  # a prerequisite module is missing (dnspython for --mx)
BANNER = 21  # no banner, or a banner that is not 2xx
HELO = 22  # EHLO (and the HELO fallback) refused
MAIL = 23  # MAIL FROM refused (or SMTPUTF8 needed but not offered)
RCPT = 24  # no recipient accepted
DATA = 25  # DATA (or a non-final BDAT chunk) refused, or CHUNKING not offered
DOT = 26  # message refused after the final dot (or the LAST BDAT chunk)
QUIT = 27  # error reply to QUIT
AUTH = 28  # AUTH not offered, refused, or not allowed in clear
TLS = 29  # STARTTLS not offered, refused, or the handshake failed
COMMAND = 30  # a POP3 or IMAP command refused (smtpchat's own: swaks speaks SMTP only)
HELO_AFTER_TLS = 32  # EHLO inside TLS refused
INTERRUPTED = 130  # interactive session ended with Ctrl-C

# The exit code a refused command maps to, by its verb (interactive mode).
BY_VERB = {
    "EHLO": HELO, "HELO": HELO, "LHLO": HELO, "MAIL": MAIL, "RCPT": RCPT, "DATA": DATA,
    "BDAT": DOT, "QUIT": QUIT, "AUTH": AUTH, "STARTTLS": TLS,
}

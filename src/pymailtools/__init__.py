"""pymailtools: the classic mail commands (sendmail, mail, mailq, postsuper) in Python."""

__version__ = "0.1.0"

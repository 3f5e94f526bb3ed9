"""pymailtools: the classic mail commands (sendmail, mail, mailq, postqueue, postsuper) in Python."""

__version__ = "0.1.0"

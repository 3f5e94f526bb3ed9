"""The MSA: new messages into the queue (sendmail, mail), and the maildrop's pickup."""

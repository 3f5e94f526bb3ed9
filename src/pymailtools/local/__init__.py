"""The MDA: local routing, aliases, mailbox delivery (mbox, Maildir), commands, files."""

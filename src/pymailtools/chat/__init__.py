"""smtpchat's library: talk SMTP by hand (console) or run one scripted test transaction."""

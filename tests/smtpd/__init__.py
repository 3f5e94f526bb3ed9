"""Tests of the SMTP listener (src/pymailtools/smtpd/)."""

"""Tests of the SMTP client (src/pymailtools/smtp/)."""

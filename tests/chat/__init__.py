"""Tests of smtpchat (src/pymailtools/chat/)."""

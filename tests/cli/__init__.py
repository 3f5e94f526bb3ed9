"""Tests of the commands (src/pymailtools/cli/)."""

"""Tests of the queue tools (src/pymailtools/admin/)."""

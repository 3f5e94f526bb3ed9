"""Tests of the queue (src/pymailtools/queue/)."""

"""Tests of the queue manager (src/pymailtools/qmgr/)."""

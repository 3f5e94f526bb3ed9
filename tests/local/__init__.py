"""Tests of local delivery (src/pymailtools/local/)."""

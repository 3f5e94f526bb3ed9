"""Tests of submission and pickup (src/pymailtools/submit/)."""

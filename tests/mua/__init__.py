"""Tests of mail(1) (src/pymailtools/mua/)."""

"""Helpers the tests share: loopback ports, DNS and SMTP peers, our listener, mail and smtpchat.

One home for each helper; the fixtures that use them stay in tests/conftest.py and the test files.
"""

"""The SMTP client: sessions and transactions, MX lookup, next-hop syntax."""

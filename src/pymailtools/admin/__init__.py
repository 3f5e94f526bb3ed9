"""Queue administration: the listing (mailq), postsuper's operations."""

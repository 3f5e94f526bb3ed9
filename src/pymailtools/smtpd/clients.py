"""Connections per client address for smtpd_client_connection_count_limit: counted in one
listener process, or across all of them in shared memory (smtpd_workers)."""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import mmap
import os
import struct
import zlib
from collections.abc import Iterator


class LocalClients:
    """Connections per client address, counted in this process (one listener process)."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    def acquire(self, ip: str, limit: int) -> bool | None:
        """Count one more connection from ``ip``: True, or False when it already has ``limit``
        (0: no limit)."""
        n = self.counts.get(ip, 0)
        if limit and n >= limit:
            return False
        self.counts[ip] = n + 1
        return True

    def release(self, ip: str) -> None:
        n = self.counts.get(ip, 1) - 1
        if n > 0:
            self.counts[ip] = n
        else:
            self.counts.pop(ip, None)


class SharedClients:
    """Connections per client address across all listener processes, so that the limit is one
    limit however the kernel spreads a client's connections over them.

    A hash table with linear probing in shared memory, made before the workers are forked.
    A row holds an address and one counter per worker: a dead worker's connections are
    forgotten by zeroing its column. Guarded by a POSIX record lock, which the kernel drops
    when its holder dies."""

    SLOTS = 8192  # client addresses connected at the same time; beyond, not counted

    def __init__(self, workers: int, slots: int = SLOTS) -> None:
        self.row = struct.Struct(f"=?16s3x{workers}I")  # in use, address, count per worker
        self.slots = slots
        self.workers = workers
        self.worker = 0  # this process's column, set in each worker after the fork
        self.keys: dict[str, bytes] = {}
        size = self.row.size * slots
        if hasattr(os, "memfd_create"):
            self.fd = os.memfd_create("pymailtools-smtpd-clients")
        else:
            # only where memfd_create is missing (not Linux)
            import tempfile

            self.fd, name = tempfile.mkstemp(prefix="pymailtools-smtpd-")
            os.unlink(name)
        os.ftruncate(self.fd, size)
        self.map = mmap.mmap(self.fd, size)

    def key(self, ip: str) -> bytes:
        """The table's key for an address (remembered: each connection asks twice)."""
        known = self.keys.get(ip)
        if known is None:
            addr = ipaddress.ip_address(ip.split("%", 1)[0])
            known = addr.packed
            if isinstance(addr, ipaddress.IPv4Address):
                known = b"\0" * 10 + b"\xff\xff" + known  # the same key as ::ffff:a.b.c.d
            if len(self.keys) >= self.slots:
                self.keys.clear()
            self.keys[ip] = known
        return known

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        fcntl.lockf(self.fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.lockf(self.fd, fcntl.LOCK_UN)

    def _home(self, key: bytes) -> int:
        return zlib.crc32(key) % self.slots

    def _read(self, i: int) -> tuple[bool, bytes, list[int]]:
        used, key, *counts = self.row.unpack_from(self.map, i * self.row.size)
        return used, key, counts

    def _write(self, i: int, key: bytes, counts: list[int]) -> None:
        self.row.pack_into(self.map, i * self.row.size, True, key, *counts)

    def _clear(self, i: int) -> None:
        size = self.row.size
        self.map[i * size:(i + 1) * size] = bytes(size)

    def _find(self, key: bytes) -> tuple[int, bool]:
        """(row, True) holding ``key``; else (the empty row for it, False); (-1, False) when
        the table is full."""
        i = self._home(key)
        for _ in range(self.slots):
            used, k, _ = self._read(i)
            if not used:
                return i, False
            if k == key:
                return i, True
            i = (i + 1) % self.slots
        return -1, False

    def _delete(self, i: int) -> None:
        """Empty row ``i``, moving later rows of its probe run back so none is cut off."""
        n = self.slots
        self._clear(i)
        j = i
        while True:
            j = (j + 1) % n
            used, key, counts = self._read(j)
            if not used:
                return
            if 0 < (self._home(key) - i) % n <= (j - i) % n:
                continue  # its home lies after the gap: it stays reachable where it is
            self._write(i, key, counts)
            self._clear(j)
            i = j

    def acquire(self, ip: str, limit: int) -> bool | None:
        """Count one more connection from ``ip`` for this worker: True; False when the client
        already has ``limit`` (0: no limit) in all workers together; None when the table is
        full (the connection is let in uncounted)."""
        key = self.key(ip)
        with self._locked():
            i, found = self._find(key)
            if i < 0:
                return None
            counts = self._read(i)[2] if found else [0] * self.workers
            if limit and sum(counts) >= limit:
                return False
            counts[self.worker] += 1
            self._write(i, key, counts)
            return True

    def release(self, ip: str) -> None:
        key = self.key(ip)
        with self._locked():
            i, found = self._find(key)
            if not found:
                return
            counts = self._read(i)[2]
            counts[self.worker] = max(0, counts[self.worker] - 1)
            if any(counts):
                self._write(i, key, counts)
            else:
                self._delete(i)

    def forget(self, worker: int) -> None:
        """Drop the connections a dead worker had counted (its clients are gone with it)."""
        with self._locked():
            rows = []
            for i in range(self.slots):
                used, key, counts = self._read(i)
                if used:
                    counts[worker] = 0
                    if any(counts):
                        rows.append((key, counts))
            self.map[:] = bytes(len(self.map))
            for key, counts in rows:
                self._write(self._find(key)[0], key, counts)

    def close(self) -> None:
        self.map.close()
        os.close(self.fd)

"""Queue ids: strict ASCII validation, uniqueness, time order."""

import time

import pytest

from pymailtools.errors import InvalidQueueId
from pymailtools.queue import ids as queueid


@pytest.mark.parametrize(
    "bad", ["", ".", "..", "../x", "ABC/DEF", "ABC\n", "A" * 10000, "١٢٣", "ＡＢＣ", "ab-c", "a b"])
def test_invalid_ids_refused(bad: str) -> None:
    assert not queueid.is_valid(bad)
    with pytest.raises(InvalidQueueId) as e:
        queueid.check(bad)
    assert e.value.exit_code == 64


def test_ids_unique_and_time_ordered() -> None:
    ids = []
    for _ in range(2000):
        ids.append(queueid.new_id())
    assert len(set(ids)) == len(ids)
    assert all(queueid.is_valid(i) for i in ids)
    prefixes = [i[: queueid.TIME_DIGITS] for i in ids]
    assert prefixes == sorted(prefixes)
    t = queueid.arrival_time(ids[-1])
    assert t is not None and abs(t - time.time()) < 5

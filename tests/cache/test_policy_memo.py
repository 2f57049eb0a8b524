"""What policy parses from a stored response's fields is kept with that response.

A hit reads the stored response's freshness facts (Cache-Control, Date, Age, Expires, ETag...).
They are parsed once per stored response and kept on it (``Stored.parsed``), so the CPU a hit
costs does not grow with the number of stored entries (bench/memory_bench.py's scaling check
with 10,000 keys found that a cache of parsed facts bounded at 4,096 responses parsed again on
every hit past that size). A response made from another (``dataclasses.replace``: freshened
headers, RFC 9111 §4.3.4) is parsed afresh.
"""

from __future__ import annotations

from dataclasses import replace

from proxyd.cache.policy import Heuristics, Stored, current_age, freshness_lifetime

HEURISTICS = Heuristics(fraction=0.1, maximum=86400.0)


def stored(max_age: int, key: int = 0) -> Stored:
    headers = (
        (b"Cache-Control", b"max-age=%d" % max_age),
        (b"Date", b"Sat, 21 Nov 2026 09:00:00 GMT"),
        (b"X-Key", b"%d" % key),
    )
    return Stored(200, headers, 1000.0, 1000.0, b"", 0)


def test_facts_are_parsed_once_per_stored_response_however_many_there_are() -> None:
    responses = [stored(60, key) for key in range(5000)]  # more than any bounded memo held
    for response in responses:
        assert response.parsed is None
        assert freshness_lifetime(response, HEURISTICS) == 60.0
    kept = [response.parsed for response in responses]
    assert all(facts is not None for facts in kept)
    for response, facts in zip(responses, kept, strict=True):
        current_age(response, 1010.0)
        assert response.parsed is facts  # read again, not parsed again


def test_the_memo_is_not_part_of_the_value() -> None:
    parsed, fresh = stored(60), stored(60)
    freshness_lifetime(parsed, HEURISTICS)
    assert parsed == fresh and hash(parsed) == hash(fresh)
    assert "parsed" not in repr(parsed)


def test_a_response_made_from_another_is_parsed_afresh() -> None:
    old = stored(60)
    assert freshness_lifetime(old, HEURISTICS) == 60.0
    freshened = replace(old, headers=stored(3600).headers)
    assert freshened.parsed is None
    assert freshness_lifetime(freshened, HEURISTICS) == 3600.0

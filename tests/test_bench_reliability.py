"""`make bench-reliability` lists every violated zero in ``problems`` (and so exits 1); a partial run never
overwrites the committed results."""

from __future__ import annotations

from typing import Any

import pytest

from bench import reliability

CLEAN: dict[str, Any] = {
    "fuzz_requests": 2459,
    "fuzz_5xx": 0,
    "fuzz_failures": [],
    "load_errors": 0,
    "load_rss_growth_mb": 4.7,
    "hostile_crashes": 0,
    "crash_lost": 0,
    "crash_duplicated": 0,
    "query_failures": 0,
    "bandit_high": 0,
    "bandit_medium": 0,
    "secrets_found": 0,
}


def test_a_clean_run_has_no_problems() -> None:
    assert reliability.find_problems(CLEAN) == []


@pytest.mark.parametrize(
    "key",
    [
        "fuzz_5xx",
        "load_errors",
        "hostile_crashes",
        "crash_lost",
        "crash_duplicated",
        "query_failures",
        "bandit_high",
        "bandit_medium",
        "secrets_found",
    ],
)
def test_every_zero_that_is_not_zero_or_is_missing_is_a_problem(key: str) -> None:
    assert reliability.find_problems({**CLEAN, key: 1}) == [key]
    assert reliability.find_problems({k: v for k, v in CLEAN.items() if k != key}) == [key]


def test_bounds_and_parts() -> None:
    assert reliability.find_problems({**CLEAN, "fuzz_requests": 10}) == ["fuzz_requests < 2000"]
    assert reliability.find_problems({**CLEAN, "fuzz_failures": ["x"]}) == ["fuzz_failures"]
    assert reliability.find_problems({**CLEAN, "load_rss_growth_mb": 51}) == ["load_rss_growth_mb"]
    # Only the parts run are judged: a static-only run does not miss its crash figures.
    assert reliability.find_problems({"bandit_high": 0, "bandit_medium": 0, "secrets_found": 0}, ["static"]) == []
    assert reliability.find_problems({}, ["crash"]) == ["crash_lost", "crash_duplicated", "query_failures"]


def test_a_partial_run_must_write_elsewhere() -> None:
    with pytest.raises(SystemExit) as exc:
        reliability.main(["--parts", "static"])
    assert exc.value.code == 2
    with pytest.raises(SystemExit):
        reliability.main(["--parts", "static,nonsense", "--out", "/dev/null"])

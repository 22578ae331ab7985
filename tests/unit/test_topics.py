"""Co-partitioning: which partition counts a worker refuses before it consumes."""

from __future__ import annotations

from sessions_app.settings import Settings
from sessions_app.stream.topics import copartitioning_problem

SETTINGS = Settings(partitions=8)
CHANGELOG = "sessions-app-session_buffers-changelog"


def counts(**given: int | None) -> dict[str, int | None]:
    names = {
        "input": SETTINGS.input_topic,
        "changelog": CHANGELOG,
        "output": SETTINGS.output_topic,
        "expired": SETTINGS.expired_topic,
    }
    return {names[key]: count for key, count in given.items()}


def test_matching_or_missing_topics_pass() -> None:
    assert copartitioning_problem(SETTINGS, CHANGELOG, counts()) is None
    assert copartitioning_problem(SETTINGS, CHANGELOG, counts(input=None, changelog=None)) is None
    every = counts(input=8, changelog=8, output=8, expired=8)
    assert copartitioning_problem(SETTINGS, CHANGELOG, every) is None
    # More output partitions than input ones hold every record the worker writes.
    assert copartitioning_problem(SETTINGS, CHANGELOG, counts(input=8, output=12)) is None


def test_each_mismatch_is_named_with_its_count() -> None:
    problem = copartitioning_problem(
        SETTINGS, CHANGELOG, counts(input=8, changelog=12, output=4, expired=8)
    )
    assert problem is not None
    assert "SESSIONS_PARTITIONS=8" in problem
    assert f"{CHANGELOG} has 12" in problem
    assert f"{SETTINGS.output_topic} has 4" in problem
    assert f"{SETTINGS.input_topic} has" not in problem
    assert "\n" not in problem


def test_an_input_that_disagrees_with_the_setting_is_refused() -> None:
    problem = copartitioning_problem(SETTINGS, CHANGELOG, counts(input=12, changelog=12))
    assert problem is not None
    assert f"{SETTINGS.input_topic} has 12" in problem
    # The changelog agrees with the input: the input alone is named.
    assert CHANGELOG not in problem

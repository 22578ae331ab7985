"""Kafka's record size limits against the largest records the worker writes: the arithmetic."""

from __future__ import annotations

from sessions_app.core.keys import MAX_SESSION_ID_BYTES
from sessions_app.core.limits import (
    KAFKA_DEFAULT_MAX_MESSAGE_BYTES,
    RECORD_OVERHEAD,
    largest_records,
    size_problem,
)
from sessions_app.core.session_state import HEADER_SIZE
from sessions_app.settings import Settings

DEFAULT = KAFKA_DEFAULT_MAX_MESSAGE_BYTES


def limits(output: int = DEFAULT, expired: int = DEFAULT, changelog: int = DEFAULT) -> dict:  # type: ignore[type-arg]
    return {
        "output": ("out", output),
        "expired": ("exp", expired),
        "changelog": ("log", changelog),
    }


def test_the_default_cap_fits_kafkas_default_limit() -> None:
    settings = Settings()
    assert (
        size_problem(
            settings.max_buffer_bytes,
            settings.delimiter,
            settings.producer_max_batch_size,
            limits(),
        )
        is None
    )
    # The old default, 1 MiB, did not: its stored state was a record Kafka refuses.
    assert size_problem(1024 * 1024, b"\n", 512 * 1024, limits()) is not None


def test_the_changelog_record_is_the_largest_and_fits_to_the_byte() -> None:
    largest = largest_records(1000, b"\r\n")
    assert largest["changelog"] == 1 + MAX_SESSION_ID_BYTES + HEADER_SIZE + 1000 + RECORD_OVERHEAD
    assert largest["output"] == largest["expired"] == MAX_SESSION_ID_BYTES + 1000 + RECORD_OVERHEAD
    exact = largest["changelog"]
    assert size_problem(1000, b"\r\n", 1000, limits(changelog=exact)) is None
    variable, why = size_problem(1000, b"\r\n", 1000, limits(changelog=exact - 1)) or ("", "")
    assert variable == "SESSIONS_MAX_BUFFER_BYTES"
    assert "log takes at most" in why and "lower the cap to 999" in why


def test_a_delimiter_longer_than_the_cap_is_what_may_stay_pending() -> None:
    # Bytes that may begin a delimiter stay pending even past a tiny cap.
    assert largest_records(2, b"0123456789")["changelog"] == largest_records(9, b"\n")["changelog"]


def test_producer_batches_must_fit_the_smallest_topic() -> None:
    variable, why = size_problem(1000, b"\n", 600_000, limits(expired=500_000)) or ("", "")
    assert variable == "SESSIONS_PRODUCER_MAX_BATCH_SIZE"
    assert "exp" in why and "500,000" in why


def test_when_no_cap_fits_the_remedy_says_so() -> None:
    variable, why = size_problem(1000, b"\n", 100, limits(output=500)) or ("", "")
    assert variable == "SESSIONS_MAX_BUFFER_BYTES"
    assert "no cap fits it" in why and "lower the cap" not in why

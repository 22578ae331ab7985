"""Cut complete records out of a session's pending bytes: pure, no I/O.

A session's byte stream is a sequence of records, each followed by the
delimiter. Fragments may split a record or the delimiter anywhere; cutting
the concatenation of all fragments at once and cutting fragment by fragment
give the same records, because the search for the next delimiter always
restarts where the last one ended and the pending tail never holds a whole
delimiter.
"""

from __future__ import annotations


def cut_records(pending: bytes, fragment: bytes, delimiter: bytes) -> tuple[list[bytes], bytes]:
    """Append `fragment` to `pending`; return the complete records and the new tail."""
    if not delimiter:
        raise ValueError("delimiter must not be empty")
    if not fragment:
        return [], pending
    # `pending` holds no whole delimiter, so the first match of a left-to-right split
    # ends inside the new fragment, as a search from the seam would find it.
    records = (pending + fragment).split(delimiter)
    tail = records.pop()
    return records, tail


def unfinished_delimiter(pending: bytes, delimiter: bytes) -> int:
    """Return how many of `pending`'s last bytes could begin a delimiter the next fragment ends.

    That is the longest end of `pending` that is a proper start of `delimiter`
    (0 for a one-byte delimiter). A flush of pending bytes must keep those bytes,
    or a delimiter split across two fragments would be cut in two and its first
    bytes sent as part of the record. `pending` holds no whole delimiter, so a
    delimiter the next fragment completes starts at the earliest such end: keeping
    the longest one keeps every cut where it would have been.
    """
    for size in range(min(len(delimiter) - 1, len(pending)), 0, -1):
        if pending.endswith(delimiter[:size]):
            return size
    return 0


def frame(records: list[bytes], delimiter: bytes) -> bytes:
    """Join records into the byte stream a producer sends: each record then the delimiter."""
    return b"".join(record + delimiter for record in records)


def is_unambiguous(record: bytes, delimiter: bytes) -> bool:
    """Tell whether `record` followed by `delimiter` cuts back into exactly `record`.

    False when the record holds the delimiter, or when its tail overlaps the
    delimiter's head so that the first match starts inside the record
    (record b"a" with delimiter b"aa").
    """
    return (record + delimiter).find(delimiter) == len(record)

"""Where a sessions-app worker's time goes, per fragment, from a py-spy profile.

    .venv/bin/python -m bench.breakdown PROFILE.txt [--us-per-fragment 15.2]

PROFILE.txt is what `bench.throughput --profile DIR` writes (py-spy's raw
format: one collapsed stack per line, then its sample count; every thread
of the worker, idle threads left out). Each sample goes to the innermost
frame of its stack that names a step of the worker's work:

  consume and parse    aiokafka's fetcher and the intake (the consumer thread)
  state read, decode   RocksDB point reads of buffers and chunks, SessionState.decode
  reassembly           PartitionBatch.apply, cut_records: the pure core
  encode               SessionState.encode, the change set's preparation
  produce outputs      records into the producer's batches (Delivery.send)
  produce changelog    changelog records into the producer's batches
  producer I/O         aiokafka's sender: requests and acknowledgements of both
  RocksDB write        write batches built and written with the count and offset
  Faust bookkeeping    acks, commits, Faust and mode services, the event loop

With --us-per-fragment (the benchmark's CPU seconds per 100k fragments, times
10), each share is also given in microseconds per fragment. Samples are wall
clock samples of threads that were not idle: a thread waiting for the GIL
counts as working, so shares are an approximation of CPU time.
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

STEPS = [
    "consume and parse",
    "state read, decode",
    "reassembly",
    "encode",
    "produce outputs",
    "produce changelog",
    "producer I/O",
    "RocksDB write",
    "Faust bookkeeping",
]

#: (function, where its file path ends) -> step; the innermost frame that matches wins.
FRAMES = {
    ("decode", "core/session_state.py"): "state read, decode",
    ("load", "engine/store.py"): "state read, decode",
    ("load_chunks", "engine/store.py"): "state read, decode",
    ("watermark", "engine/store.py"): "state read, decode",
    ("live_count", "engine/store.py"): "state read, decode",
    ("encode", "core/session_state.py"): "encode",
    ("prepare", "stream/pipeline.py"): "encode",
    ("apply", "core/batch.py"): "reassembly",
    ("cut_records", "core/reassembly.py"): "reassembly",
    ("changelog_records", "stream/pipeline.py"): "produce changelog",
    ("write_batch", "stream/pipeline.py"): "RocksDB write",
    ("prepare_write", "engine/store.py"): "RocksDB write",
    ("commit", "engine/store.py"): "RocksDB write",
    ("ack_records", "engine/intake.py"): "Faust bookkeeping",
    ("_drain_messages", "engine/intake.py"): "consume and parse",
    ("to_fragment", "engine/intake.py"): "consume and parse",
}

#: Where Faust's offset commit is: bookkeeping wherever it is called from.
FAUST_COMMIT = "faust/transport/consumer.py"

#: Parts of a file path that put a frame in a step, when no function rule matched.
FILES = {
    "aiokafka/consumer/": "consume and parse",
    "aiokafka/record/": "consume and parse",
    "aiokafka/producer/sender.py": "producer I/O",
    "aiokafka/producer/message_accumulator.py": "producer I/O",
    "aiokafka/conn.py": "producer I/O",
}


def parse_frame(frame: str) -> tuple[str, str]:
    """Return (function, file) of a py-spy frame `function (file:line)`."""
    name, _, where = frame.partition(" (")
    # py-spy qualifies names: `SessionState.decode`, `PartitionStore.loader.<locals>.load`.
    return name.strip().rsplit(".", 1)[-1], where.rsplit(":", 1)[0]


def step_of(stack: list[str]) -> str:
    """Return the step a collapsed stack (outermost frame first) belongs to.

    The innermost frame of sessions-app's own code decides; library frames under it
    (aiokafka's record appends under Delivery.hand_over) count for it. Faust's offset
    commits count as bookkeeping wherever they are called from. Stacks without a
    frame of sessions-app's code go by the library file of their innermost frame.
    """
    frames = [parse_frame(frame) for frame in stack]
    if any(
        name == "commit" and path.endswith("faust/transport/consumer.py") for name, path in frames
    ):
        return "Faust bookkeeping"
    ours = [
        (name, path.rsplit("sessions_app/", 1)[-1])
        for name, path in frames
        if "sessions_app/" in path
    ]
    names = set(ours)
    for name, short in reversed(ours):
        if name == "hand_over" and short == "stream/delivery.py":
            # One method hands both over: Delivery.send calls it for outputs.
            outputs = ("send", "stream/delivery.py") in names
            return "produce outputs" if outputs else "produce changelog"
        if name == "send" and short == "stream/delivery.py":
            return "produce outputs"
        step = FRAMES.get((name, short))
        if step is not None:
            return step
    for _, path in reversed(frames):
        for part, file_step in FILES.items():
            if part in path:
                return file_step
    return "Faust bookkeeping"


def breakdown(profile: Path) -> Counter[str]:
    """Return the samples of each step in a py-spy raw profile."""
    samples: Counter[str] = Counter()
    for line in profile.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        samples[step_of(stack.split(";"))] += int(count)
    return samples


def report(samples: Counter[str], us_per_fragment: float | None = None) -> str:
    """Return the table of steps: share of samples and, if known, microseconds per fragment."""
    total = sum(samples.values()) or 1
    lines = [f"{'step':<20}{'share':>7}" + (f"{'us/fragment':>13}" if us_per_fragment else "")]
    for step in STEPS:
        share = samples[step] / total
        row = f"{step:<20}{share:>7.1%}"
        if us_per_fragment:
            row += f"{share * us_per_fragment:>13.2f}"
        lines.append(row)
    if us_per_fragment:
        lines.append(f"{'total':<20}{1:>7.0%}{us_per_fragment:>13.2f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("profile", type=Path, nargs="+")
    parser.add_argument("--us-per-fragment", type=float)
    args = parser.parse_args()
    samples: Counter[str] = Counter()
    for path in args.profile:
        samples += breakdown(path)
    print(report(samples, args.us_per_fragment))


if __name__ == "__main__":
    main()

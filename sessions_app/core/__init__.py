"""The pure core: reassembly, session state, key layout, batches, capacity, totals.

Nothing here imports faust, aiokafka or rocksdict, so all of it is tested
without a broker or a disk (mypy strict; ruff's banned-api rule enforces it).
"""

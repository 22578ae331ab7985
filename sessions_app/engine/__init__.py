"""The engine room: the only code that touches Faust's or aiokafka's private names.

intake (the consumer), recovery (table recovery's order), store (the one door to
RocksDB) and allocator (glibc's malloc, CPython's collector). Each patch names the
version it was checked against.
"""

"""Commands beside `worker`: the embedded broker, the load generator and the verifier."""

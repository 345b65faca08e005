"""`pdpipe bench`: load generation against an OpenAI-compatible server and layout comparisons.

- `serve`: one workload at one arrival process against a running server; per-request records,
  percentiles, goodput under SLOs, and (given the launch's run dir) each request's TTFT split by
  pipeline stage from the scheduler's traces.
- `compare`: launches each config in turn, sweeps request rates with the same workload, and reports
  per layout the latency percentiles, SLO attainment, goodput and where the layouts cross.
- `plot`: the PNG plots of a `compare.json` (matplotlib, the `bench` extra).
"""

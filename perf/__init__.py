"""Benchmarks: perf_analyzer sweeps, reports, a config tuner and bare-engine timings.

Results are flat JSON with units in the keys (e.g. `throughput_img_per_s`,
`latency_p99_ms`), written under `perf/results/`.
"""

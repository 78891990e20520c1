"""Benchmarks, run from the repository root as modules (`python -m bench.bench_train_step`,
`python -m bench.bench_packing`, `python -m bench.accelerator`). Nothing is imported here: the
accelerator script must load on an image without torch or the data pipeline's extras."""

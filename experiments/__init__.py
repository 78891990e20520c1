"""Experiments on the oracle tasks, run from the repository root as modules
(`python -m experiments.oracle.run_all`, `python -m experiments.oracle.make_sft`,
`python -m experiments.interval.measure`); `recipes/` holds training configs, not code."""

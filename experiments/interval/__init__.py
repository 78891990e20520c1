"""The interval oracle task's measurements (`measure`); its SFT model and feedback sets are made by
`experiments.oracle.make_sft` / `make_feedback` with `--task interval`."""

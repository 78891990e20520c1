"""The arithmetic oracle task's scripts (SFT model, feedback sets, sanity check) and the evidence
protocol that compares methods on both oracle tasks (`run_all`, with `protocol`, `stats`, `report`)."""

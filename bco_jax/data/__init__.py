"""Binary-feedback datasets: formats, TRL-identical tokenization, a resumable grain pipeline."""

"""The online loop's measurements: which verifiable-instruction families SmolLM2-135M-Instruct meets
sometimes but not always (`instruction_rates`)."""

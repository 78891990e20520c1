"""Real-model demonstrations (issue 21): SmolLM2-135M-Instruct in the online loop."""

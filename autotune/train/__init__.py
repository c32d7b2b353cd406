"""The reference trainer: a Llama-style decoder executing any scheduling policy's plan."""

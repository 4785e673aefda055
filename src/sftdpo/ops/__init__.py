"""Model-level operations that know nothing of tasks or tokenization: batching, log-probs, generation."""

"""Training: one optimizer step (step.py), the loop over stages and epochs (loop.py), checkpoints
(checkpoint.py), shared SFT prefixes (prefix.py), and the entry of a study's run process (worker.py)."""

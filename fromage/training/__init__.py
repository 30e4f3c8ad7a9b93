"""Training: the joint loop and what it needs (prefixes, refinement, validation, resume state, processes)."""

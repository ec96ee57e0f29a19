"""Generation: grammar-constrained sampling with a KV cache, from a MIDI prompt or from nothing."""

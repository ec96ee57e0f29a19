"""Data: the bundled corpus, the token store, parallel encoding, and batching."""

"""KV cache layout and the decode loop."""

"""Downstream runs on the engine: fine-tuning, linear probing and training from scratch."""

"""A minimal third-party medformer plugin (used by the test suite and the README guide)."""

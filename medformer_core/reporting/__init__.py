"""Reporting: the progress line, metric plots and sample pictures."""

"""Data: convert, split, decode, transform and stream images."""

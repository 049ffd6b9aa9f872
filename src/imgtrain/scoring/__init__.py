"""Score Image Model and Evaluate Model."""

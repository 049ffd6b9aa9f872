"""The on-disk artefacts: ImageDirectory and model directories, written atomically."""

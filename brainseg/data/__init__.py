"""Data layer: layout discovery, TIFF I/O and validation, manifest, split, preprocessing."""

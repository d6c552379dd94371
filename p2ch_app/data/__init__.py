"""Data layer: LUNA16 index, CT loading and geometry, cache, synthetic data."""

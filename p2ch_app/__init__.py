"""p2ch_app: lung-nodule detection on chest CT, from LUNA16-style data to a per-scan report."""

__version__ = "0.1.0"

"""Scoring detections against annotations, over one scan or many series."""

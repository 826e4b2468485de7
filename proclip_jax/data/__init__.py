"""Datasets (tfds ArrayRecord), grain input pipelines, image transforms, the demo world."""

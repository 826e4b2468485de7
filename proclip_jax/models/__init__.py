"""Flax Linen models: CLIP towers, text embedders, the ProCLIP adapter and two-tower model."""

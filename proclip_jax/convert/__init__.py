"""Weight converters: PyTorch / Hugging Face checkpoints to Flax parameter trees and back."""

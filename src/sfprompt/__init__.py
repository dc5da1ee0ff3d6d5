"""SFPrompt: split federated prompt fine-tuning of pre-trained Vision Transformers."""

__version__ = "0.1.0"

"""SFPrompt: split federated prompt fine-tuning of pre-trained Vision Transformers."""

__version__ = "0.1.0"
__all__ = ["load_run"]


def __getattr__(name: str):
    """`sfprompt.load_run(folder)`: a finished run as one torch.nn.Module (imported on first use, so the
    command line starts without loading PyTorch for --help)."""
    if name == "load_run":
        from .predict import load_run

        return load_run
    raise AttributeError(f"module 'sfprompt' has no attribute {name!r}")

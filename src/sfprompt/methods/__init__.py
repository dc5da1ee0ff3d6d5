"""The federated methods, by the name `--method` takes."""

from .base import Method
from .fl import FedFull
from .fl_prompt import FedPrompt
from .linear_probe import LinearProbe
from .sfl import SplitFed
from .sfprompt import SFPrompt
from .sl import SplitLearning

METHODS: dict[str, type[Method]] = {m.name: m for m in (SFPrompt, SplitFed, SplitLearning, FedPrompt, FedFull, LinearProbe)}

__all__ = ["METHODS", "Method"]

"""Vanilla split learning (Gupta & Raskar, 2018): clients one after another, no averaging."""

from .sfl import SplitFed


class SplitLearning(SplitFed):
    name = "sl"
    sequential = True

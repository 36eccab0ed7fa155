"""Factories that do not give a module: one returns a number, one raises."""


def make_model():
    return 42


def make_failing():
    raise ValueError("hidden_size must be positive")

"""Benchmarks against PyTorch: ``lnorm bench ops`` and ``lnorm bench rnn``."""

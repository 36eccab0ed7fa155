"""Kernels and autograd for the norm ops. Users want :mod:`lnorm.functional` instead."""

"""Kernels, their dispatch and autograd: the backend registry (:mod:`~lnorm.ops.backend`), the norm
op (:mod:`~lnorm.ops.norm`) and the recurrent layers' fused path (:mod:`~lnorm.ops.rnn`). Users
want :mod:`lnorm.functional` and :mod:`lnorm.nn` instead."""

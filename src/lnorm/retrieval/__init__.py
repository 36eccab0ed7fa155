"""Image-sentence retrieval with order embeddings (Vendrov et al. 2016), small and offline.

Real MNIST digits paired with English captions generated from a concept hierarchy over the digits
(:mod:`~lnorm.retrieval.captions`, :mod:`~lnorm.retrieval.data`); an MLP image encoder and a GRU
or layer-normalized GRU sentence encoder (:mod:`~lnorm.retrieval.models`); the order-violation
penalty and ranking loss (:mod:`~lnorm.retrieval.losses`); R@K and mean rank
(:mod:`~lnorm.retrieval.metrics`); and the training protocol (:mod:`~lnorm.retrieval.train`).
The lab's ``retrieval`` experiment (claim C12) runs it.
"""

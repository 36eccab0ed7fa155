"""Image-sentence retrieval with order embeddings (Vendrov et al. 2016), small and offline.

Real MNIST digits paired with English captions generated from a concept hierarchy over the digits
(:mod:`~lnorm.lab.retrieval.captions`, :mod:`~lnorm.lab.retrieval.data`); an MLP image encoder and a GRU
or layer-normalized GRU sentence encoder (:mod:`~lnorm.lab.retrieval.models`); the order-violation
penalty and ranking loss (:mod:`~lnorm.lab.retrieval.losses`); R@K and mean rank
(:mod:`~lnorm.lab.retrieval.metrics`); and the training protocol (:mod:`~lnorm.lab.retrieval.train`).
The lab's ``retrieval`` experiment (claim C12) runs it.
"""

"""The article's claims (product.md), by id: the rows of the report's claims table."""

CLAIMS = {
    "C1": "LN statistics are per sample: outputs do not depend on batch size or batch composition.",
    "C2": "LN computes the same thing in training and inference; BN does not (train/eval gap).",
    "C3": "BN degrades with small batches and cannot train at batch size 1; LN works at any batch size.",
    "C4": "LN stabilises RNN hidden states and speeds up convergence of RNN language models.",
    "C5": "LN is the right choice in transformers; BN works poorly there.",
    "C6": "In feed-forward nets BN is often as good or better at normal batch sizes.",
    "C7": "In CNNs, BN beats LN (LN still beats no normalization).",
    "C8": "LN adds computational overhead per step compared with BN or no normalization.",
    "C9": "LN speeds up convergence and helps generalization compared with no normalization.",
    "C10": "Gain initialised to 1 and bias to 0 is the right default.",
    "C11": "LN may want a higher learning rate than the unnormalized net.",
    "C12": "LN helps image-sentence retrieval with order embeddings (faster convergence, better recall).",
    "C13": "LN keeps gradients well-scaled in deep nets (no vanishing or exploding gradients).",
}


# The one pre-registered test per claim: (experiment, row key). The claim's summary verdict is
# this row's verdict; every other row of the claim is secondary (Holm-corrected in the report).
# Chosen as the most direct test of the statement, before seeing results.
PRIMARY = {
    "C1": ("e2", "C1-batch-independence"),  # by construction: per-sample statistics
    "C2": ("e2", "C2-bn-train-eval-gap"),  # LN's part holds by construction; BN's gap is measured
    "C3": ("e1", "C3-small-batch-drop"),  # BN's accuracy drop to a small batch exceeds LN's
    "C4": ("e3", "C4-lstm-convergence"),  # char LM: mean validation bpc over training, LSTM vs LN-LSTM
    "C5": ("e4", "C5-preln-vs-prebn"),
    "C6": ("e1", "C6-bn-vs-ln-large-batch"),
    "C7": ("e5", "C7-bn-vs-ln"),
    "C8": ("e6", "C8-ln-overhead"),  # the same implementation with and without LN
    "C9": ("e3", "C9-lstm-final-bpc"),  # char LM: held-out bpc at the end of training
    "C10": ("e7", "C10-gain-one-vs-0.1"),
    "C11": ("e4", "C11-transformer-best-lr"),  # the article means transformers and RNNs, not MLPs
    "C12": ("retrieval", "C12-test-rsum"),
    "C13": ("e8", "C13-grad-spread"),
}
ROLES = ("primary", "secondary", "by construction")


def claim_key(claim_id: str) -> int:
    return int(claim_id.lstrip("C"))

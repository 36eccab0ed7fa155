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


def claim_key(claim_id: str) -> int:
    return int(claim_id.lstrip("C"))

"""lnorm.lab.retrieval: caption generator, order-violation loss, retrieval metrics, encoders, trainer."""

import itertools
import math
import random

import pytest
import torch

from lnorm.lab.retrieval import captions as C
from lnorm.lab.retrieval import data, losses, metrics
from lnorm.lab.retrieval.models import RetrievalModel, SentenceEncoder

# ----------------------------------------------------------------------- caption generator

WORD_NUMBERS = {w: i for i, w in enumerate(C.NUMBER_WORDS)} | {str(i): i for i in range(10)}
GREATER_HEADS = {"greater", "larger", "bigger", "above"}
LESS_HEADS = {"less", "smaller", "below"}


def read_concepts(text: str) -> set[str]:
    """An independent reader of the captions' English: the concept names a text expresses."""
    toks = text.split()
    out, i = {"digit"}, 0
    while i < len(toks):
        t = toks[i]
        if t in GREATER_HEADS or t in LESS_HEADS:
            j = i + 1
            while toks[j] not in WORD_NUMBERS:  # "greater than five" / "above 5"
                j += 1
            out.add(("gt" if t in GREATER_HEADS else "lt") + str(WORD_NUMBERS[toks[j]]))
            i = j + 1
            continue
        if toks[i:i + 4] == ["not", "divisible", "by", "two"]:
            out.add("odd")
            i += 4
            continue
        if toks[i:i + 3] == ["divisible", "by", "two"]:
            out.add("even")
            i += 3
            continue
        if t in ("even", "odd", "prime"):
            out.add(t)
        elif t in WORD_NUMBERS:  # a number not after a comparison names the digit itself
            out.add(f"is{WORD_NUMBERS[t]}")
        i += 1
    return out


def digits_where(concepts: set[str]) -> set[int]:
    def holds(name: str, d: int) -> bool:
        if name == "digit":
            return True
        if name == "even":
            return d % 2 == 0
        if name == "odd":
            return d % 2 == 1
        if name == "prime":
            return d in (2, 3, 5, 7)
        k = int(name[2:])
        return {"gt": d > k, "lt": d < k, "is": d == k}[name[:2]]

    return {d for d in range(10) if all(holds(c, d) for c in concepts)}


def test_every_caption_says_exactly_its_concepts():
    caps = C.all_captions()
    assert len(caps) > 1000 and len({c.text for c in caps}) == len(caps)  # texts are unique
    for c in caps:
        assert read_concepts(c.text) == set(c.concepts), c.text
        assert set(c.extension) == digits_where(set(c.concepts)), c.text
        assert c.extension, c.text  # no caption describes nothing


@pytest.mark.parametrize(
    "text, digits",
    [("a digit", range(10)), ("an even digit", (0, 2, 4, 6, 8)), ("a digit greater than five", (6, 7, 8, 9)),
     ("the digit four", (4,)), ("an odd number less than 6", (1, 3, 5)),
     ("a numeral that is prime and above two", (3, 5, 7)),
     ("a digit greater than five that is even", (6, 8)), ("an 8 which is even", (8,))],
)
def test_known_captions(text, digits):
    by_text = {c.text: c for c in C.all_captions()}
    assert set(by_text[text].extension) == set(digits)


def test_articles():
    texts = [c.text for c in C.all_captions()]
    assert "an even digit" in texts and "an eight" in texts and "a one" in texts and "an 8" in texts
    assert not any(t.startswith("a even") or t.startswith("an digit") or t.startswith("an one") for t in texts)


def one_caption_per_meaning():
    rng = random.Random(0)
    return [C.caption(m, rng) for m in C.MEANINGS]


def test_partial_order_is_set_inclusion_of_what_captions_describe():
    caps = one_caption_per_meaning()
    for a, b in itertools.product(caps, caps):
        implied = all(b.covers(d) for d in range(10) if a.covers(d))
        assert C.below(a, b) == implied
        # antisymmetric up to meaning: mutual order means they describe the same images
        if C.below(a, b) and C.below(b, a):
            assert a.extension == b.extension
    top = C.Caption("a digit", frozenset({"digit"}))
    assert all(C.below(c, top) for c in caps)
    four = C.Caption("the digit four", frozenset({"digit", "is4"}))
    even = C.Caption("an even digit", frozenset({"digit", "even"}))
    odd = C.Caption("an odd digit", frozenset({"digit", "odd"}))
    assert C.below(four, even) and not C.below(even, four) and not C.below(four, odd)


def test_partial_order_is_transitive():
    caps = one_caption_per_meaning()[::3]
    for a, b, c in itertools.product(caps, caps, caps):
        if C.below(a, b) and C.below(b, c):
            assert C.below(a, c)


@pytest.mark.parametrize("digit", range(10))
@pytest.mark.parametrize("max_extension", [None, 1, 3])
def test_sampled_captions_describe_their_digit(digit, max_extension):
    rng = random.Random(digit)
    for _ in range(50):
        c = C.sample_caption(digit, rng, max_extension)
        assert c.covers(digit)
        assert max_extension is None or len(c.extension) <= max_extension
        assert read_concepts(c.text) == set(c.concepts)


def test_generator_rejects_bad_input():
    with pytest.raises(ValueError, match="digit"):
        C.meanings_covering(10)
    with pytest.raises(ValueError, match="max_extension"):
        C.meanings_covering(3, 0)
    with pytest.raises(ValueError, match="unknown concept"):
        C.extension({"digit", "huge"})
    with pytest.raises(ValueError, match="meaning"):
        C.realisations({"digit", "even", "odd"})


# ------------------------------------------------------------------------------------ data


def test_split_is_fixed_stratified_and_disjoint():
    sp = data.mnist_split()
    assert {k: len(v[1]) for k, v in sp.items()} == {"train": 4000, "val": 500, "test": 500}
    for name, (_, y) in sp.items():
        assert torch.bincount(y, minlength=10).tolist() == [data.PER_CLASS[name]] * 10
    rows = {name: {hash(x.numpy().tobytes()) for x in X} for name, (X, _) in sp.items()}
    assert not rows["train"] & rows["test"] and not rows["train"] & rows["val"] and not rows["val"] & rows["test"]


def test_captioned_split_pairs_true_captions_with_images():
    s = data.captioned("val", 5, max_extension=3)
    assert s.tokens.shape[0] == 5 * len(s.digits) == len(s.texts)
    cov = s.covers()  # (M, N)
    assert cov[torch.arange(len(s.texts)), s.cap_image].all()  # each caption is true of its own image
    assert (s.cap_ext.sum(1) <= 3).all()
    vocab = C.vocabulary()
    for m in (0, 7, 123):  # tokens decode back to the text
        assert " ".join(vocab[i] for i in s.tokens[m, : s.lengths[m]]) == s.texts[m]
    again = data.captioned("val", 5, max_extension=3)
    assert again.texts == s.texts  # deterministic


# ---------------------------------------------------------------------------------- losses


def test_order_violation_hand_computed():
    c = torch.tensor([[1.0, 0.0], [0.2, 0.5]])
    i = torch.tensor([[0.5, 0.5], [0.0, 1.0]])
    # E[0,0] = (1-.5)^2 + 0 ; E[0,1] = (1-0)^2 + 0 ; E[1,0] = 0 + 0 (0.5-0.5) ; E[1,1] = .2^2 + 0
    want = torch.tensor([[0.25, 1.0], [0.0, 0.04]])
    torch.testing.assert_close(losses.order_violation(c, i), want)
    torch.testing.assert_close(losses.order_violation(c, i, chunk=1), want)


def test_contrastive_loss_hand_computed():
    S = -torch.tensor([[0.25, 1.0], [0.0, 0.04]])  # scores from the example above
    # captions for image 0: caption 1 vs pair (0,0): .05 - (-.25) + 0 = .30 ; image 1: .05 + .04 - 1 < 0
    # images for caption 1: image 0 vs pair (1,1): .05 - (-.04) + 0 = .09 ; caption 0: .05 + .25 - 1 < 0
    torch.testing.assert_close(losses.contrastive_loss(S, margin=0.05), torch.tensor(0.39))
    torch.testing.assert_close(losses.contrastive_loss(S, margin=0.05, reduction="mean"), torch.tensor(0.195))
    # caption 1 truly describes image 0: not a negative, so nothing is left to push apart
    neg = torch.tensor([[False, True], [False, False]])
    torch.testing.assert_close(losses.contrastive_loss(S, neg, margin=0.05), torch.tensor(0.0))


def test_contrastive_loss_matches_a_loop():
    g = torch.Generator().manual_seed(0)
    B = 7
    S = torch.randn(B, B, generator=g) * 0.1
    neg = torch.rand(B, B, generator=g) > 0.3
    m = 0.05
    want = 0.0
    for b in range(B):
        for a in range(B):
            if a != b and neg[a, b]:
                want += max(0.0, m - S[b, b].item() + S[a, b].item())  # contrastive caption a, image b
            if a != b and neg[b, a]:
                want += max(0.0, m - S[b, b].item() + S[b, a].item())  # contrastive image a, caption b
    assert math.isclose(losses.contrastive_loss(S, neg, m).item(), want, rel_tol=1e-5)


def test_embeddings_are_nonnegative_unit_vectors():
    x = torch.randn(5, 8)
    e = losses.order_embed(x)
    assert (e >= 0).all()
    torch.testing.assert_close(e.norm(dim=1), torch.ones(5))
    # an image dominating its caption coordinate-wise has zero violation; the reverse does not
    cap, img = torch.tensor([[0.1, 0.2]]), torch.tensor([[0.3, 0.2]])
    assert losses.order_violation(cap, img).item() == 0 and losses.order_violation(img, cap).item() > 0


def test_loss_rejects_bad_input():
    with pytest.raises(ValueError, match="square"):
        losses.contrastive_loss(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="negatives"):
        losses.contrastive_loss(torch.zeros(2, 2), torch.ones(2, 2))
    with pytest.raises(ValueError, match="method"):
        losses.scores(torch.zeros(1, 2), torch.zeros(1, 2), "euclid")
    with pytest.raises(ValueError, match="captions and images"):
        losses.order_violation(torch.zeros(1, 2), torch.zeros(1, 3))


# --------------------------------------------------------------------------------- metrics


def test_ranks_on_a_tiny_known_ranking():
    scores = torch.tensor([[0.9, 0.5, 0.1, 0.0], [0.2, 0.8, 0.3, 0.1], [0.4, 0.3, 0.7, 0.6]])
    relevant = torch.tensor([[False, True, False, False], [True, False, False, False], [False, True, True, True]])
    # q0: best relevant .5, one wrong item above -> 2 ; q1: .2, two above (.8, .3) -> 3 ;
    # q2: best relevant .7 is first -> 1
    ranks = metrics.first_relevant_rank(scores, relevant)
    assert ranks.tolist() == [2, 3, 1]
    m = metrics.ranking_metrics(ranks, ks=(1, 2, 3))
    assert m["r1"] == pytest.approx(100 / 3) and m["r2"] == pytest.approx(200 / 3) and m["r3"] == 100
    assert m["mean_rank"] == pytest.approx(2.0) and m["median_rank"] == 2


def test_ties_count_against_the_query():
    ranks = metrics.first_relevant_rank(torch.tensor([[0.0, 0.0, -1.0]]), torch.tensor([[True, False, False]]))
    assert ranks.tolist() == [2]


def test_retrieval_metrics_both_directions():
    # 2 captions x 3 images; caption 0 describes images 0 and 2, caption 1 describes image 1
    S = torch.tensor([[0.1, 0.9, 0.5], [0.2, 0.3, 0.8]])
    cov = torch.tensor([[True, False, True], [False, True, False]])
    m = metrics.retrieval_metrics(S, cov, ks=(1, 2))
    # image retrieval: caption 0 -> best true image .5 behind .9 -> 2 ; caption 1 -> .3 behind .8 -> 2
    assert m["image_mean_rank"] == 2 and m["image_r1"] == 0 and m["image_r2"] == 100
    # caption retrieval: image 0 -> caption 0 (.1) behind .2 -> 2 ; image 1 -> caption 1 (.3) < .9 -> 2 ;
    # image 2 -> caption 0 (.5) behind .8 -> 2
    assert m["caption_mean_rank"] == 2 and m["caption_r1"] == 0
    assert m["rsum"] == pytest.approx(200.0)


def test_order_auc_matches_sklearn_with_ties():
    sk = pytest.importorskip("sklearn.metrics")
    g = torch.Generator().manual_seed(1)
    S = torch.randint(0, 5, (20, 30), generator=g).double()  # many ties
    cov = torch.rand(20, 30, generator=g) > 0.6
    assert metrics.order_auc(S, cov) == pytest.approx(sk.roc_auc_score(cov.flatten().numpy(), S.flatten().numpy()))


def test_metrics_reject_bad_input():
    with pytest.raises(ValueError, match="no relevant item"):
        metrics.first_relevant_rank(torch.zeros(2, 2), torch.tensor([[True, False], [False, False]]))
    with pytest.raises(TypeError, match="bool"):
        metrics.first_relevant_rank(torch.zeros(2, 2), torch.ones(2, 2))


# ---------------------------------------------------------------------------------- models


@pytest.mark.parametrize("rnn", ["gru", "ln_gru"])
def test_sentence_encoding_ignores_padding(rnn):
    torch.manual_seed(0)
    enc = SentenceEncoder(len(C.vocabulary()), word_dim=8, dim=6, rnn=rnn)
    s = data.captioned("test", 1, limit=6)
    alone = torch.cat([enc(s.tokens[m:m + 1, : s.lengths[m]], s.lengths[m:m + 1]) for m in range(6)])
    together = enc(s.tokens[:6], s.lengths[:6])
    assert s.lengths[:6].unique().numel() > 1  # the batch really mixes lengths
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)


def test_model_options_fail_fast():
    with pytest.raises(ValueError, match="rnn"):
        RetrievalModel(10, rnn="lstm")
    with pytest.raises(ValueError, match="method"):
        RetrievalModel(10, method="dot")


@pytest.mark.parametrize("rnn, method", [("ln_gru", "order"), ("gru", "cosine")])
def test_tiny_training_run_learns(rnn, method):
    from lnorm.lab.retrieval.train import TrainConfig, train

    cfg = TrainConfig(rnn=rnn, method=method, dim=32, word_dim=16, image_hidden=64, batch_size=64,
                      steps=40, eval_every=20, train_images=500, eval_images=100)
    r = train(cfg, seed=0)
    t = r["test"]
    assert all(math.isfinite(v) for v in t.values())
    assert r["curve"]["step"] == [0, 20, 40]
    # 40 steps on 500 images: validation recall climbs well above where it started
    assert r["best_val_rsum"] > r["curve"]["val_rsum"][0] + 25
    assert 0.5 < t["order_auc"] <= 1.0

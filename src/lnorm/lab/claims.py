"""The article's claims (product.md) by id, the pre-registered primary test of each, and the
report's per-claim view of the experiments' claim rows (Holm on secondary rows, the summary)."""

from lnorm.lab import stats as S

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
    "C14": "BN is hard to apply to RNNs: per-time-step statistics fail past the training length and at batch size 1.",
}


# The one pre-registered test per claim: (experiment, row key). The claim's summary verdict is
# this row's verdict; every other row of the claim is secondary (Holm-corrected in the report),
# or a component of this one (ROLES). Chosen as the most direct test of the statement, before
# seeing results.
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
    "C14": ("e9", "C14-longer-test-sequences"),  # BN-LSTM's accuracy lost past the training length, minus LN-LSTM's
}
# A "component" row is one part of a primary test made of several (C7: BN beats LN, and LN beats no
# norm): the primary is supported only if every part is (an intersection-union test, which needs no
# multiplicity correction), so a component is decided at the unadjusted level and kept out of the
# Holm family; the verdict the report shows for it is the one the primary used.
ROLES = ("primary", "secondary", "component", "by construction")


def claim_key(claim_id: str) -> int:
    return int(claim_id.lstrip("C"))


# ---------------------------------------------------------------- the report's view of the rows


def adjust_secondary(rows: list[dict]) -> list[dict]:
    """Holm-correct each claim's secondary rows (those with an effect) and re-decide them.

    Component rows (:data:`ROLES`) are not in the family: the primary's verdict was built from
    their unadjusted verdict, and an intersection-union test needs no correction, so adjusting
    them would show a part of the primary with a verdict the primary did not use.

    The adjustment can only weaken a verdict (adjusted p-values are larger). A row whose verdict
    is not its effect's own (a composite rule, a caveat) keeps it unless it read "supported" and
    the effect no longer clears 0 at the adjusted level. Returns new row dicts with
    ``verdict_unadjusted`` and ``holm`` (family size and adjusted p-values) added to the adjusted ones.
    """
    out = [dict(r) for r in rows]
    families: dict[str, list[dict]] = {}
    for r in out:
        if r.get("role") == "secondary" and r.get("effect"):
            families.setdefault(r["claim"], []).append(r)
    for fam in families.values():
        p_pos = S.holm([r["effect"]["p_positive"] for r in fam])
        p_eq = S.holm([r["effect"]["p_equivalent"] for r in fam])
        for r, pp, pe in zip(fam, p_pos, p_eq, strict=True):
            e = r["effect"]
            redo = S.verdict_of(e["estimate"], pp, pe, e["min_effect"])
            own = r["verdict"] == e["verdict"]
            new = redo if own else (S.INCONCLUSIVE if r["verdict"] == S.SUPPORTED and pp >= S.ALPHA else r["verdict"])
            r["holm"] = {"family": len(fam), "p_positive": pp, "p_equivalent": pe}
            r["verdict_unadjusted"], r["verdict"] = r["verdict"], new
    return out


NOT_RUN = "not run"


def summary(rows: list[dict], experiments_run: list[str]) -> list[dict]:
    """One row per claim, from its pre-registered primary row (:data:`PRIMARY`).

    When the primary experiment ran but emitted no row with the registered key (an experiment not
    yet on the decision rules), its first row for the claim stands in, marked "no effect size".
    """
    out = []
    for claim in sorted(CLAIMS, key=claim_key):
        exp, key = PRIMARY[claim]
        mine = [r for r in rows if r["claim"] == claim and r.get("experiment") == exp]
        row = next((r for r in mine if r.get("key") == key), None)
        s = {"claim": claim, "statement": CLAIMS[claim], "experiment": exp, "key": key, "effect": None,
             "role": "primary", "verdict": NOT_RUN, "criterion": "", "caveats": [], "decides": ""}
        legacy = [r for r in mine if "key" not in r]
        if row is None and legacy:
            row = legacy[0]
            s["role"] = "stand-in"
        if row is None:
            s["decides"] = (f"{exp} ran but gave no {claim} row" if exp in experiments_run
                            else f"primary test ({exp}) not in this run")
            out.append(s)
            continue
        s.update(verdict=row["verdict"], criterion=row.get("criterion", ""), effect=row.get("effect"),
                 caveats=list(row.get("caveats", [])))
        if row.get("role") == "by construction":
            s["role"] = "by construction"
        s["decides"] = _decides(s, row)
        out.append(s)
    return out


def _decides(s: dict, row: dict) -> str:
    """Whether the data could decide, in words: the caveats, or why the test was undecided."""
    parts = list(s["caveats"])
    if s["role"] == "by construction":
        parts.insert(0, "holds by construction: not evidence the experiment found")
    elif s["effect"] is None:
        parts.insert(0, "stand-in row: its experiment is not on the decision rules yet" if s["role"] == "stand-in"
                     else "no effect size")
    elif s["verdict"] == S.INCONCLUSIVE and s["effect"].get("reason"):
        parts.append(s["effect"]["reason"])
    return "; ".join(parts) or "yes"

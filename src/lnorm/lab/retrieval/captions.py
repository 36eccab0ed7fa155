"""English captions for digit images, generated from a concept hierarchy over the digits 0-9.

A *concept* is a named set of digits (its extension)::

    digit            {0..9}                     the root: every caption names it
    even / odd       {0,2,4,6,8} / {1,3,5,7,9}
    prime            {2,3,5,7}
    gt{k}            {k+1..9}     "greater than k", k = 1..8
    lt{k}            {0..k-1}     "less than k",    k = 1..8
    is{d}            {d}          "the digit d",    d = 0..9

A caption is a short English phrase built from a *meaning*: a set of concepts whose intersection
is non-empty, e.g. ``{digit, even, gt5}`` -> "an even digit greater than five" (extension
{6, 8}). Surface forms vary the noun (digit / number / numeral / handwritten digit), synonyms
("greater than" / "larger than" / "bigger than" / "above"), numbers as words or numerals, and word
order (prenominal adjective, relative clause with either order of its predicates, postposed
modifier). Every caption carries its concept set, so what it means is known exactly.

The partial order (the structure order embeddings model, Vendrov et al. 2016): a caption *covers*
an image when the image's digit lies in the caption's extension; caption a lies below caption b
(a is at least as specific) when extension(a) is a subset of extension(b). "a digit" is the top;
"the digit four" lies below "an even digit", which covers every image of a 4.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass, field
from functools import cache

# ------------------------------------------------------------------------------- concepts

DIGITS = tuple(range(10))
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
THRESHOLDS = tuple(range(1, 9))  # k in gt{k} / lt{k}
PROPERTIES = ("even", "odd", "prime")


def _build_concepts() -> dict[str, frozenset[int]]:
    c = {"digit": frozenset(DIGITS)}
    c["even"] = frozenset(d for d in DIGITS if d % 2 == 0)
    c["odd"] = frozenset(d for d in DIGITS if d % 2 == 1)
    c["prime"] = frozenset({2, 3, 5, 7})
    for k in THRESHOLDS:
        c[f"gt{k}"] = frozenset(d for d in DIGITS if d > k)
        c[f"lt{k}"] = frozenset(d for d in DIGITS if d < k)
    for d in DIGITS:
        c[f"is{d}"] = frozenset({d})
    return c


CONCEPTS: dict[str, frozenset[int]] = _build_concepts()


def extension(concepts) -> frozenset[int]:
    """The digits satisfying every concept in ``concepts`` (the intersection of their extensions)."""
    out = frozenset(DIGITS)
    for name in concepts:
        if name not in CONCEPTS:
            raise ValueError(f"concepts: unknown concept {name!r}; valid: {', '.join(CONCEPTS)}")
        out = out & CONCEPTS[name]
    return out


@dataclass(frozen=True)
class Caption:
    """A caption's text and the concept set it was generated from."""

    text: str
    concepts: frozenset[str]
    extension: frozenset[int] = field(init=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "extension", extension(self.concepts))

    def covers(self, digit: int) -> bool:
        """True when the caption truly describes an image of ``digit``."""
        return digit in self.extension

    def tokens(self) -> list[str]:
        return tokenize(self.text)


def below(a: Caption, b: Caption) -> bool:
    """The partial order: ``a`` is at least as specific as ``b`` (every image a covers, b covers)."""
    return a.extension <= b.extension


def tokenize(text: str) -> list[str]:
    return text.lower().split()


# -------------------------------------------------------------------------------- meanings


def _meanings() -> list[frozenset[str]]:
    """Every concept set a caption may express (non-empty extension), in a fixed order."""
    comparisons = [f"gt{k}" for k in THRESHOLDS] + [f"lt{k}" for k in THRESHOLDS]
    out: list[frozenset[str]] = [frozenset({"digit"})]
    out += [frozenset({"digit", p}) for p in PROPERTIES]
    out += [frozenset({"digit", c}) for c in comparisons]
    out += [frozenset({"digit", p, "prime"}) for p in ("even", "odd")]
    out += [frozenset({"digit", p, c}) for p in PROPERTIES for c in comparisons]
    # ranges "greater than a and less than b" with at least two digits inside
    out += [frozenset({"digit", f"gt{a}", f"lt{b}"}) for a in THRESHOLDS for b in THRESHOLDS if b - a >= 3]
    out += [frozenset({"digit", f"is{d}"}) for d in DIGITS]
    out += [frozenset({"digit", f"is{d}", "even" if d % 2 == 0 else "odd"}) for d in DIGITS]
    seen, unique = set(), []
    for m in out:
        ext = extension(m)
        # drop meanings no digit satisfies ("a prime digit less than two")
        if ext and m not in seen:
            seen.add(m)
            unique.append(m)
    return unique


MEANINGS: tuple[frozenset[str], ...] = tuple(_meanings())


def meanings_covering(digit: int, max_extension: int | None = None) -> tuple[frozenset[str], ...]:
    """The meanings whose extension contains ``digit`` (and has at most ``max_extension`` digits)."""
    if isinstance(digit, bool) or digit not in DIGITS:
        raise ValueError(f"digit must be an int in 0..9, got {digit!r}")
    if max_extension is not None and not (
        isinstance(max_extension, int) and not isinstance(max_extension, bool) and max_extension >= 1
    ):
        raise ValueError(f"max_extension must be None or an int >= 1, got {max_extension!r}")
    return _covering(int(digit), max_extension)


@cache
def _covering(digit: int, max_extension: int | None) -> tuple[frozenset[str], ...]:
    return tuple(
        m
        for m in MEANINGS
        if digit in extension(m) and (max_extension is None or len(extension(m)) <= max_extension)
    )


# ---------------------------------------------------------------------------- surface forms

NOUNS = ("digit", "number", "numeral", "handwritten digit")
GREATER = ("greater than", "larger than", "bigger than", "above")
LESS = ("less than", "smaller than", "below")
RELATIVE = ("that is", "which is")
PREDICATES = {  # property -> predicate forms after "that is"
    "even": ("even", "divisible by two"),
    "odd": ("odd", "not divisible by two"),
    "prime": ("prime", "a prime"),
}
_VOWEL_SOUND = ("a", "e", "i", "o", "u", "8", "eight", "11", "18")


def _article(next_word: str) -> str:
    if next_word in ("one",) or next_word.startswith("un"):
        return "a"
    return "an" if next_word.startswith(_VOWEL_SOUND) else "a"


def _numbers(k: int) -> tuple[str, str]:
    return NUMBER_WORDS[k], str(k)


def _comparison_forms(name: str) -> list[str]:
    k = int(name[2:])
    words = GREATER if name.startswith("gt") else LESS
    return [f"{w} {n}" for w in words for n in _numbers(k)]


def _join_mods(mod_lists: list[list[str]]) -> list[str]:
    """All ways of saying several modifiers, in every order, joined by 'and'."""
    out = []
    for order in itertools.permutations(mod_lists):
        for choice in itertools.product(*order):
            out.append(" and ".join(choice))
    return out


def _with_article(phrase: str) -> str:
    return f"{_article(phrase.split()[0])} {phrase}"


def realisations(meaning) -> list[str]:
    """Every surface form of ``meaning`` (a concept set from ``MEANINGS``), in a fixed order."""
    meaning = frozenset(meaning)
    if meaning not in set(MEANINGS):
        raise ValueError(f"meaning: {sorted(meaning)!r} is not one of the generator's meanings")
    exact = [c for c in meaning if c.startswith("is")]
    props = sorted(c for c in meaning if c in PROPERTIES)
    comps = sorted(c for c in meaning if c[:2] in ("gt", "lt"))
    out: list[str] = []
    if exact:
        d = int(exact[0][2:])
        for n in _numbers(d):
            if not props:
                out += [f"the digit {n}", f"the number {n}", f"the numeral {n}", _with_article(n),
                        _with_article(f"handwritten {n}")]
            else:
                (p,) = props
                out += [f"the {p} digit {n}", f"the {p} number {n}"]
                out += [f"{_with_article(n)} {rel} {pred}" for rel in RELATIVE for pred in PREDICATES[p]]
        return out
    comp_forms = [_comparison_forms(c) for c in comps]
    pred_forms = [list(PREDICATES[p]) for p in props]
    for noun in NOUNS:
        if not props and not comps:
            out.append(_with_article(noun))
            continue
        # prenominal adjectives (at most two: "even prime") then postposed comparisons
        adjectives = " ".join(props)
        head = _with_article(f"{adjectives} {noun}" if adjectives else noun)
        if comps:
            out += [f"{head} {m}" for m in _join_mods(comp_forms)]
        else:
            out.append(head)
        # relative clause holding every predicate, in every order
        bare = _with_article(noun)
        for rel in RELATIVE:
            out += [f"{bare} {rel} {m}" for m in _join_mods(pred_forms + comp_forms)]
        # comparison postposed, property in a relative clause: "a digit greater than five that is even"
        if props and comps:
            for rel in RELATIVE:
                out += [f"{bare} {c} {rel} {p}" for c in _join_mods(comp_forms) for p in _join_mods(pred_forms)]
    return out


@cache
def _realisations_cached(meaning: frozenset[str]) -> tuple[str, ...]:
    return tuple(realisations(meaning))


def caption(meaning, rng: random.Random) -> Caption:
    """One caption expressing ``meaning``, its surface form drawn uniformly by ``rng``."""
    forms = _realisations_cached(frozenset(meaning))
    return Caption(forms[rng.randrange(len(forms))], frozenset(meaning))


def sample_caption(digit: int, rng: random.Random, max_extension: int | None = None) -> Caption:
    """A caption that truly describes an image of ``digit``: meaning uniform over the meanings that
    cover the digit (with at most ``max_extension`` digits), then a uniform surface form."""
    choices = meanings_covering(digit, max_extension)
    return caption(choices[rng.randrange(len(choices))], rng)


def all_captions() -> list[Caption]:
    """Every caption the generator can produce (a few thousand)."""
    return [Caption(text, m) for m in MEANINGS for text in _realisations_cached(m)]


@cache
def vocabulary() -> tuple[str, ...]:
    """The generator's closed vocabulary, with index 0 the padding token ``<pad>``."""
    words = sorted({w for c in all_captions() for w in tokenize(c.text)})
    return ("<pad>", *words)

"""Seeded generator of the English-like text the bundled tiny model is trained, calibrated and evaluated on.

The text is produced by a small grammar so that it is original, reproducible from a seed, and regular enough
for a two-layer model to learn within a minute of CPU training: the resulting model has a perplexity far below
its vocabulary size, which is what makes quantization error (KL divergence, perplexity ratio) measurable.
"""

from __future__ import annotations

import random

NAMES = ["Ada", "Bram", "Chiara", "Dmitri", "Elif", "Farid", "Greta", "Hiro", "Ines", "Jonas", "Kaia", "Lior",
         "Mara", "Nils", "Oona", "Pavel", "Quinn", "Rosa", "Sami", "Tove", "Ugo", "Vera", "Wren", "Yusuf"]
ROLES = ["the miller", "the baker", "the engineer", "the gardener", "the pilot", "the teacher", "the weaver",
         "the clockmaker", "the librarian", "the fisher", "the painter", "the doctor"]
ANIMALS = ["fox", "heron", "otter", "crow", "badger", "goat", "hare", "owl", "trout", "beetle"]
PLACES = ["the mill", "the harbour", "the old bridge", "the market", "the orchard", "the station",
          "the workshop", "the river bank", "the hill road", "the north gate", "the library", "the square"]
THINGS = ["a lantern", "the grain", "a basket of apples", "the copper wire", "a map", "the ledger",
          "a wooden gear", "the spare wheel", "a jar of honey", "the long rope", "a letter", "the brass key"]
ADJ = ["quiet", "bright", "heavy", "narrow", "warm", "cold", "careful", "patient", "sudden", "steady", "small",
       "broad", "early", "late", "clever", "tired"]
VERBS_T = ["carried", "mended", "found", "counted", "painted", "weighed", "sold", "opened", "cleaned", "measured",
           "wrapped", "checked"]
VERBS_I = ["waited", "laughed", "listened", "slept", "walked home", "sang", "worked late", "looked around"]
ADV = ["slowly", "quickly", "carefully", "quietly", "again", "at once", "without a word", "twice"]
TIMES = ["in the morning", "at noon", "before dawn", "after supper", "on Monday", "on the first day of spring",
         "in the evening", "late at night", "during the storm", "when the bells rang"]
WEATHER = ["rain", "snow", "fog", "wind", "sunshine", "hail", "a grey drizzle"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
FUNCS = ["total", "scale", "mean", "clamp", "blend", "count"]


def _who(rng: random.Random) -> str:
    return rng.choice(NAMES) if rng.random() < 0.6 else rng.choice(ROLES)


def sentence(rng: random.Random) -> str:
    """One sentence of the grammar (the generator of the text, and of the bundled tasks' questions)."""
    kind = rng.randrange(10)
    w = _who(rng)
    if kind == 0:
        s = f"{w} {rng.choice(VERBS_T)} {rng.choice(THINGS)} at {rng.choice(PLACES)} {rng.choice(TIMES)}."
    elif kind == 1:
        s = f"{w} {rng.choice(VERBS_I)} {rng.choice(ADV)} near {rng.choice(PLACES)}."
    elif kind == 2:
        s = f"The {rng.choice(ADJ)} {rng.choice(ANIMALS)} watched {w} from {rng.choice(PLACES)}."
    elif kind == 3:
        n, m = rng.randint(2, 40), rng.randint(2, 40)
        s = f"{w} counted {n} crates and then {m} more, so there were {n + m} crates in all."
    elif kind == 4:
        s = (f"On {rng.randint(1, 28)} {rng.choice(MONTHS)} there was {rng.choice(WEATHER)}, "
             f"and {w} stayed at {rng.choice(PLACES)}.")
    elif kind == 5:
        s = f"\"Where is {rng.choice(THINGS)}?\" asked {w}. \"At {rng.choice(PLACES)},\" said {_who(rng)}."
    elif kind == 6:
        s = f"Because the day was {rng.choice(ADJ)}, {w} {rng.choice(VERBS_T)} {rng.choice(THINGS)} {rng.choice(ADV)}."
    elif kind == 7:
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        s = f"{w} wrote on the board: {a} times {b} is {a * b}."
    elif kind == 8:
        f, k = rng.choice(FUNCS), rng.randint(1, 9)
        s = f"In the notebook {w} kept a rule: def {f}(x): return x * {k} + {k}."
    else:
        s = (f"{w} and {_who(rng)} {rng.choice(VERBS_I)} while the {rng.choice(ANIMALS)} "
             f"{rng.choice(VERBS_I)}.")
    return s[0].upper() + s[1:]


def generate(seed: int, n_paragraphs: int) -> str:
    """Return ``n_paragraphs`` paragraphs of text generated from ``seed`` (same seed, same text)."""
    rng = random.Random(seed)
    paragraphs = []
    for _ in range(n_paragraphs):
        paragraphs.append(" ".join(sentence(rng) for _ in range(rng.randint(3, 7))))
    return "\n\n".join(paragraphs) + "\n"

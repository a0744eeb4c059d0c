"""Seeded generators of the bundled evaluation texts for the domains beyond prose: ``code`` (Python functions with
their brackets, operators and indentation), ``math`` (worked arithmetic with the results computed),
``multilingual`` (short sentences in seven languages and three scripts) and ``chat`` (conversations, one JSON list
of messages a line, rendered through the model's chat template). Offline and the same bytes on every machine;
``python -m quantmill.bundled.domains`` rewrites them in ``text/``. They measure how a quant treats text unlike its calibration prose, not a model's skill.
"""

from __future__ import annotations

import random
from pathlib import Path

HERE = Path(__file__).resolve().parent / "text"
NOUNS = ["item", "order", "row", "price", "count", "name", "value", "score", "weight", "total", "record", "node"]
VERBS = ["load", "parse", "merge", "filter", "count", "sort", "check", "build", "scale", "split", "render", "sum"]
OPS = ["+", "-", "*", "//", "%"]
CMP = ["<", ">", "<=", ">=", "==", "!="]


def _function(rng: random.Random) -> str:
    verb, noun, other = rng.choice(VERBS), rng.choice(NOUNS), rng.choice(NOUNS)
    name = f"{verb}_{noun}s"
    limit, step = rng.randint(2, 99), rng.randint(1, 9)
    lines = [f"def {name}({noun}s: list[int], {other}: int = {limit}) -> dict[str, int]:",
             f'    """{verb.capitalize()} the {noun}s whose {other} passes the limit."""',
             "    result = {}",
             f"    for i, {noun} in enumerate({noun}s):"]
    body = rng.randint(1, 3)
    for _ in range(body):
        a, op, b = rng.choice([noun, other, "i"]), rng.choice(OPS), rng.randint(1, 20)
        lines += [f"        if {a} {rng.choice(CMP)} {b}:",
                  f"            result[f\"{{{noun}}}-{{i}}\"] = ({a} {op} {step}) * {b}"]
    if rng.random() < 0.5:
        lines += ["        else:", "            continue"]
    lines += [f"    return {{k: v for k, v in sorted(result.items()) if v > {rng.randint(0, 9)}}}", ""]
    if rng.random() < 0.4:
        lines += [f"class {noun.capitalize()}{verb.capitalize()}er:",
                  f"    def __init__(self, {noun}s=None):",
                  f"        self.{noun}s = list({noun}s or [])",
                  "",
                  "    def __len__(self) -> int:",
                  f"        return len(self.{noun}s)",
                  ""]
    return "\n".join(lines) + "\n"


def _problem(rng: random.Random) -> str:
    a, b, c = rng.randint(2, 999), rng.randint(2, 99), rng.randint(2, 12)
    kind = rng.randrange(4)
    if kind == 0:
        return f"Compute {a} + {b} * {c}.\n{b} * {c} = {b * c}, and {a} + {b * c} = {a + b * c}.\nAnswer: {a + b * c}\n"
    if kind == 1:
        q, r = divmod(a, c)
        return f"Divide {a} by {c}.\n{c} * {q} = {c * q}, remainder {a} - {c * q} = {r}.\nAnswer: {q} r {r}\n"
    if kind == 2:
        return (f"Solve {c}x - {b} = {c * a - b}.\n{c}x = {c * a - b} + {b} = {c * a}, so x = {c * a} / {c}.\n"
                f"Answer: x = {a}\n")
    share = round(100 * b / (a + b), 2)
    return f"What share of {a + b} is {b}?\n{b} / {a + b} = {b / (a + b):.4f}, that is {share} %.\nAnswer: {share} %\n"


# Short sentences in other languages and scripts: a quant's loss on text its calibration never saw.
LANGUAGES = {
    "de": ("{n} trug {t} {w} zum Bahnhof.", "Am {d} war es {a} in {p}.", "Die Müllerin wartete geduldig auf {n}."),
    "fr": ("{n} a porté {t} jusqu'à la gare {w}.", "Le {d}, il faisait {a} à {p}.", "Élodie écoutait sans un mot."),
    "es": ("{n} llevó {t} a la estación {w}.", "El {d} hacía {a} en {p}.", "¿Dónde está la llave de latón?"),
    "pl": ("{n} niósł {t} na dworzec {w}.", "W {d} było {a} w {p}.", "Źródło rzeki leży za młynem."),
    "tr": ("{n} {t} istasyona {w} taşıdı.", "{d} günü {p} çok {a} idi.", "Değirmenci ağır çuvalı kaldırdı."),
    "el": ("Ο {n} μετέφερε {t} στον σταθμό {w}.", "Την {d} έκανε {a} στην {p}.", "Ο μυλωνάς περίμενε υπομονετικά."),
    "ru": ("{n} отнёс {t} на вокзал {w}.", "В {d} в {p} было {a}.", "Мельник долго ждал у ворот."),
}
FILL = {"n": ["Ada", "Jonas", "Mara", "Pavel", "Elif", "Hiro"], "t": ["la lampe", "das Seil", "el mapa", "list",
        "anahtar", "το γράμμα", "письмо"], "w": ["early", "3", "7", "12"], "d": ["Montag", "lundi", "lunes",
        "poniedziałek", "pazartesi", "Δευτέρα", "понедельник"], "a": ["kalt", "froid", "calor", "zimno", "sıcak",
        "κρύο", "тепло"], "p": ["Lyon", "Kraków", "İzmir", "Αθήνα", "Казань", "Sevilla"]}
TOPICS = ["the mill", "the harbour", "the market", "the orchard", "the station", "the workshop", "the library"]
THINGS = ["a lantern", "the grain", "a map", "the ledger", "a wooden gear", "a jar of honey", "the brass key"]


def _sentence(rng: random.Random) -> str:
    lang = rng.choice(sorted(LANGUAGES))
    return rng.choice(LANGUAGES[lang]).format(**{k: rng.choice(v) for k, v in FILL.items()})


def _conversation(rng: random.Random) -> str:
    """One line of JSON: a short exchange about the bundled model's world, rendered later by its chat template."""
    import json

    place, thing = rng.choice(TOPICS), rng.choice(THINGS)
    turns = [{"role": "user", "content": f"Where did the miller leave {thing}?"},
             {"role": "assistant", "content": f"The miller left {thing} at {place} in the morning."}]
    if rng.random() < 0.5:
        turns += [{"role": "user", "content": f"And who carried it to {rng.choice(TOPICS)}?"},
                  {"role": "assistant", "content": f"{rng.choice(FILL['n'])} carried it there before noon."}]
    return json.dumps(turns, ensure_ascii=False)


def generate(kind: str, n: int, seed: int = 7) -> str:
    rng = random.Random(f"{kind}:{seed}")
    make = {"code": _function, "math": _problem, "multilingual": _sentence, "chat": _conversation}[kind]
    return "\n".join(make(rng) for _ in range(n)) + ("\n" if kind in ("chat", "multilingual") else "")


def main() -> None:
    (HERE / "code.txt").write_text(generate("code", 40))  # counts: tests/integration/test_domains.py
    (HERE / "math.txt").write_text(generate("math", 160))
    (HERE / "multilingual.txt").write_text(generate("multilingual", 400))
    (HERE / "chat.jsonl").write_text(generate("chat", 200))


if __name__ == "__main__":
    main()

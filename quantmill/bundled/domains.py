"""Seeded generators of the bundled evaluation texts for the domains beyond prose: ``code`` (Python functions with
their brackets, operators and indentation) and ``math`` (worked arithmetic with the results computed). Offline and
the same bytes on every machine; ``python -m quantmill.bundled.domains`` rewrites ``text/code.txt`` and
``text/math.txt``. They measure how a quant treats text unlike its calibration prose, not a model's skill.
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


def generate(kind: str, n: int, seed: int = 7) -> str:
    rng = random.Random(f"{kind}:{seed}")
    make = {"code": _function, "math": _problem}[kind]
    return "\n".join(make(rng) for _ in range(n))


def main() -> None:
    (HERE / "code.txt").write_text(generate("code", 40))
    (HERE / "math.txt").write_text(generate("math", 160))


if __name__ == "__main__":
    main()

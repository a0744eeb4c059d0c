"""Seeded generators of the bundled lm-evaluation-harness tasks: multiple-choice questions drawn from the grammar
the bundled model learned (``corpus``), so that its unquantized accuracy is well above chance and a quant's loss of
it is measurable. ``cloze``: a sentence's true ending against the endings of three other sentences. Offline, the same bytes on every machine;
``python -m quantmill.bundled.tasks`` rewrites them in ``text/tasks/`` (a task YAML and its data file each).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from quantmill.bundled import corpus

HERE = Path(__file__).resolve().parent / "text" / "tasks"
N_DOCS = 120
YAML = """# lm-evaluation-harness task over a local data file (quantmill validate.tasks); made by quantmill.bundled.tasks.
task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {name}.jsonl
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def _split(sentence: str) -> tuple[str, str]:
    """A sentence cut before one of its last three words: the context, and the ending (with its space)."""
    words = sentence.split(" ")
    cut = max(1, len(words) - 3)
    return " ".join(words[:cut]), " " + " ".join(words[cut:])


def cloze(rng: random.Random) -> dict:
    context, ending = _split(corpus.sentence(rng))
    others = set()
    while len(others) < 3:
        other = _split(corpus.sentence(rng))[1]
        if other != ending:
            others.add(other)
    choices = sorted(others | {ending})
    rng.shuffle(choices)
    return {"context": context, "choices": choices, "label": choices.index(ending)}


KINDS = {"cloze": cloze}


def write(directory: Path = HERE, seed: int = 11) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for kind, make in KINDS.items():
        rng = random.Random(f"{seed}-{kind}")
        name = f"quantmill_{kind}"
        docs = [make(rng) for _ in range(N_DOCS)]
        (directory / f"{name}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
        (directory / f"{name}.yaml").write_text(YAML.format(name=name))
        written.append(directory / f"{name}.yaml")
    return written


if __name__ == "__main__":
    for path in write():
        print(path)

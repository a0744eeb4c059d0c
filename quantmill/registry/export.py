"""Artifacts handed to a person: the files users load, under readable names in a folder of their choosing, the model
card beside them, and the command that runs each. The bytes are the store's own (a hard link where the folder is on
the same filesystem, else a copy checked against the record).
"""

from __future__ import annotations

import os
import re
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from quantmill import constants as C
from quantmill.digest import sha256_file
from quantmill.errors import IntegrityError
from quantmill.store import provenance
from quantmill.store.local import ArtifactRef, Store

PROMPT = "Once upon a time"


@dataclass
class Exported:
    recipe: str
    format: str
    path: Path  # the file (one-file formats) or the folder
    size_bytes: int
    card: Path | None
    verdict: str
    passed: bool | None
    run: list[str] = field(default_factory=list)  # commands that load it

    def to_json(self) -> dict[str, Any]:
        return {"recipe": self.recipe, "format": self.format, "path": str(self.path), "size_bytes": self.size_bytes,
                "card": str(self.card) if self.card else None, "verdict": self.verdict, "passed": self.passed,
                "run": self.run}


def readable_name(model: str, recipe: str, fmt: str, quant: dict[str, Any]) -> str:
    """``<model>-<type>`` as people name GGUF files (``Llama-3-8B-Q4_K_M``); ``<model>-<recipe>`` for the other
    formats, whose type alone (W4A16, Q4) would not say which method made it."""
    kind = (quant.get("quant_type_requested") or quant.get("quant_type")) if fmt == "gguf" else None
    kind = kind or recipe
    return re.sub(r"[^A-Za-z0-9._-]+", "-", f"{model}-{kind}").strip("-")


def verdict_of(validation: dict[str, Any] | None) -> tuple[str, bool | None]:
    if not validation:
        return "not validated", None
    if validation.get("status") != "passed":
        failed = [g["name"] for g in validation.get("checks", []) if not g.get("passed")]
        return f"failed {', '.join(failed) or 'validation'}", False
    parts = []
    if validation.get("mean_kld") is not None:
        parts.append(f"KLD {validation['mean_kld']:.4f}")
    if validation.get("ppl_ratio") is not None:
        parts.append(f"PPL ×{validation['ppl_ratio']:.3f}")
    if validation.get("top1_agreement") is not None:
        parts.append(f"top-1 {validation['top1_agreement'] * 100:.1f}%")
    return "passed" + (f" ({', '.join(parts)})" if parts else ""), True


def run_commands(fmt: str, path: Path) -> list[str]:
    where = str(path)
    if fmt == "gguf":
        return [f'llama-cli -m {where} -p "{PROMPT}"', f"llama-server -m {where}"]
    if fmt == "mlx":
        return [f'mlx_lm.generate --model {where} --prompt "{PROMPT}"']
    if fmt == "onnx":  # onnxruntime-genai has no command of its own: its Python API, greedy, 64 tokens
        return [f"python -c \"import onnxruntime_genai as og; m = og.Model('{where}'); t = og.Tokenizer(m); "
                f"p = og.GeneratorParams(m); p.set_search_options(max_length=64); g = og.Generator(m, p); "
                f"g.append_tokens(t.encode('{PROMPT}')); exec('while not g.is_done(): g.generate_next_token()'); "
                f"print(t.decode(g.get_sequence(0)))\""]
    return [f"vllm serve {where}",
            f"python -c \"from transformers import pipeline; print(pipeline('text-generation', '{where}')"
            f"('{PROMPT}')[0]['generated_text'])\""]


def place(src: Path, dst: Path, sha256: str) -> None:
    """``dst`` holds ``src``'s bytes: a hard link, else a copy whose digest is checked; replaced atomically."""
    if dst.exists() and os.path.samefile(src, dst):
        return
    tmp = dst.with_name(f".{dst.name}.{uuid.uuid4().hex[:8]}")
    try:
        try:
            os.link(src, tmp)
        except OSError:  # another filesystem, or links not allowed there
            shutil.copyfile(src, tmp)
            if sha256_file(tmp) != sha256:
                raise IntegrityError(f"{dst}: the copy's sha256 differs from the store's record; nothing written")
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)


def export(store: Store, ref: ArtifactRef, out: Path, *, model: str, recipe: str, fmt: str,
           validation: dict[str, Any] | None, card: str | None) -> Exported:
    """Place one artifact's user files in ``out`` under a readable name, its card beside them."""
    files = store.verified_files(ref)
    quant = store.read_result(ref)
    subjects = [s for s in provenance.user_subjects_of(store.statement(ref.key)) if s.path != C.RESULT_FILE]
    name = readable_name(model, recipe, fmt, quant)
    out.mkdir(parents=True, exist_ok=True)
    if len(subjects) == 1 and "/" not in subjects[0].path:  # one file: <name>.<ext> with <name>.md beside it
        (subject,) = subjects
        target = out / f"{name}{Path(subject.path).suffix}"
        place(files / subject.path, target, subject.sha256)
        card_path = out / f"{name}.md" if card else None
    else:  # a checkpoint folder, its card as the folder's README.md
        target = out / name
        for subject in subjects:
            dst = target / subject.path
            dst.parent.mkdir(parents=True, exist_ok=True)
            place(files / subject.path, dst, subject.sha256)
        card_path = target / C.MODEL_CARD_FILE if card else None
    if card_path is not None:
        card_path.write_text(card)
    verdict, passed = verdict_of(validation)
    return Exported(recipe, fmt, target, sum(s.size for s in subjects), card_path, verdict, passed,
                    run_commands(fmt, target))

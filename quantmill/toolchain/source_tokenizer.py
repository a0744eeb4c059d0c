"""The source model's tokenizer, as the pipeline uses it: fixed ids for calibration and evaluation."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# Tokenizer classes that load tokenizer.json as it is written (the others rebuild parts of it in their own way).
VERBATIM = ("PreTrainedTokenizerFast", "TokenizersBackend")


class SourceTokenizer:
    """``tokenizer.json`` through the tokenizers library (fast, no torch); transformers for a model that ships
    only ``tokenizer.model``."""

    def __init__(self, model_dir: Path):
        self.model_dir = model_dir
        config_path = model_dir / "tokenizer_config.json"
        self.config: dict[str, Any] = json.loads(config_path.read_text()) if config_path.is_file() else {}
        if (model_dir / "tokenizer.json").is_file():
            from tokenizers import Tokenizer

            fast = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
            self._encode = lambda text: fast.encode(text, add_special_tokens=False).ids
            self._token_to_id = fast.token_to_id
        else:
            from transformers import AutoTokenizer

            hf = AutoTokenizer.from_pretrained(model_dir)
            self._encode = lambda text: hf.encode(text, add_special_tokens=False)
            self._token_to_id = hf.convert_tokens_to_ids

    def encode(self, text: str) -> list[int]:
        """Ids of ``text`` without special tokens."""
        return self._encode(text)

    def special_id(self, name: str) -> int | None:
        """The id of ``bos_token`` / ``eos_token`` as tokenizer_config.json names it."""
        value = self.config.get(name)
        if isinstance(value, dict):
            value = value.get("content")
        return self._token_to_id(value) if value else None

    @property
    def chat_template(self) -> str | None:
        if (self.model_dir / "chat_template.jinja").is_file():
            return (self.model_dir / "chat_template.jinja").read_text()
        return self.config.get("chat_template")

    def render_chat(self, messages: list[dict[str, str]]) -> str:
        """A conversation as the model sees it: through its chat template, in a sandbox, as transformers does."""
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        template = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(self.chat_template)
        token = lambda name: (self.config.get(name) or {}).get("content") if isinstance(  # noqa: E731
            self.config.get(name), dict) else self.config.get(name) or ""
        return template.render(messages=messages, bos_token=token("bos_token"), eos_token=token("eos_token"),
                               add_generation_prompt=False)

    def text_of(self, files: list[Path]) -> str:
        """An evaluation text: plain files as they are; ``.jsonl`` files hold one conversation a line (a list of
        ``{"role", "content"}``), each rendered through the chat template."""
        parts = []
        for path in files:
            if path.suffix == ".jsonl":
                parts += [self.render_chat(json.loads(line)) for line in path.read_text(encoding="utf-8").splitlines()
                          if line.strip()]
            else:
                parts.append(path.read_text(encoding="utf-8"))
        return "\n\n".join(parts)


def disagreement(model_dir: Path, probes: list[str]) -> str | None:
    """How the tokenizer class the model names (``tokenizer_config.json``, what transformers and every runtime
    load) encodes differently from its ``tokenizer.json`` (what the pipeline's fixed ids come from); None if they
    agree on every probe. When they differ, every artifact would fail the tokenizer gate for a fault of the source."""
    if not (model_dir / "tokenizer.json").is_file() or not (model_dir / "tokenizer_config.json").is_file():
        return None
    named = json.loads((model_dir / "tokenizer_config.json").read_text()).get("tokenizer_class")
    if named in (None, *VERBATIM):
        return None
    from transformers import AutoTokenizer

    ours, theirs = SourceTokenizer(model_dir), AutoTokenizer.from_pretrained(str(model_dir))
    for probe in probes:
        a, b = ours.encode(probe), theirs.encode(probe, add_special_tokens=False)
        if a != b:
            return (f"probe {probe[:24]!r} is {len(a)} ids by tokenizer.json but {len(b)} ids by its tokenizer class "
                    f"{type(theirs).__name__}")
    return None

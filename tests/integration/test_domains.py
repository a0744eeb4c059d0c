"""Quality per domain: each further domain (code, math) has its evaluation set and one reference pass, every
artifact is measured on it, and a domain's gate can refuse what passes on prose."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from quantmill import constants as C
from quantmill.backends.local_publisher import LocalRegistry
from quantmill.backends.local_source import BUNDLED_ROOT
from quantmill.outcome import RAN
from quantmill.prefect.launch import run_config
from quantmill.store import open_store
from tests.conftest import compose_in, plant

DOMAINS = "validate.domains=[code,math,multilingual,chat]"


@pytest.fixture(scope="module")
def by_domain(tmp_path_factory):
    root = tmp_path_factory.mktemp("domains")
    # Text far from the bundled model's training prose (mixed languages, its chat format) moves a 4-bit quant
    # well past the recipes' prose gates: measured here, not gated.
    loose = [f"+validate.domain_gates.{d}.{g}=null" for d in ("multilingual", "chat")
             for g in ("max_mean_kld", "max_ppl_ratio")]
    outcomes = {o.spec_id: o for o in run_config(compose_in(root, "recipe=[gguf_q8_0,gguf_q4_k_m,gguf_q2_k]",
                                                             DOMAINS, *loose))}
    return root, outcomes


def test_every_artifact_is_measured_on_every_domain_against_one_reference_each(by_domain):
    root, outcomes = by_domain
    assert all(o.ok for o in outcomes.values()), [(o.spec_id, o.error) for o in outcomes.values() if not o.ok]
    references = sorted(s for s, o in outcomes.items() if s.startswith("validate:reference-") and o.status == RAN)
    assert references == ["validate:reference-gguf", "validate:reference-gguf-chat", "validate:reference-gguf-code",
                          "validate:reference-gguf-math", "validate:reference-gguf-multilingual"]
    kld = {(r, d): outcomes[f"validate:gguf_{r}{'@' + d if d != 'prose' else ''}"].result["mean_kld"]
           for r in ("q8_0", "q4_k_m", "q2_k") for d in ("prose", "code", "math", "multilingual", "chat")}
    for d in ("prose", "code", "math", "multilingual", "chat"):  # fewer bits, further from the original, everywhere
        assert kld[("q8_0", d)] < kld[("q4_k_m", d)] < kld[("q2_k", d)], (d, kld)
    assert kld[("q2_k", "code")] > 2 * kld[("q2_k", "prose")], kld  # code suffers more than the calibration prose
    # flips: greedy continuations of the windows' openings that leave the original's
    flips = {r: outcomes[f"validate:gguf_{r}"].result["flip_rate"] for r in ("q8_0", "q4_k_m", "q2_k")}
    assert flips["q8_0"] <= flips["q4_k_m"] <= flips["q2_k"] and flips["q2_k"] > 0, flips
    report = json.loads((root / "store" / "reports" / "tiny-llama" / "report.json").read_text())
    rows = {r["recipe"]: r for r in report["artifacts"]}
    assert sorted(rows) == ["gguf_q2_k", "gguf_q4_k_m", "gguf_q8_0"]
    assert rows["gguf_q2_k"]["domains"]["code"]["mean_kld"] == pytest.approx(kld[("q2_k", "code")])
    assert rows["gguf_q2_k"]["mean_kld_se"] > 0  # each figure with its standard error over windows
    html = (root / "store" / "reports" / "tiny-llama" / "report.html").read_text()
    assert "<h2>By domain</h2>" in html and "code: mean KLD" in html
    card = LocalRegistry(root / "store" / C.REGISTRY_DIR).card("tiny-llama-gguf_q2_k", 1)
    assert "## Quality by domain" in card and all(f"| {d} | " in card for d in ("code", "math", "multilingual", "chat"))
    # registry search by a domain's quality: Q4_K_M is within 0.05 on prose and on code, Q2_K on neither
    from quantmill.registry.operations import Filters, search

    registry = LocalRegistry(root / "store" / C.REGISTRY_DIR)
    names = lambda **kw: sorted(e["name"] for e in search(registry, Filters(**kw)))  # noqa: E731
    bound = (kld[("q4_k_m", "code")] + kld[("q2_k", "code")]) / 2
    assert names(max_kld=bound, domain="code") == ["tiny-llama-gguf_q4_k_m", "tiny-llama-gguf_q8_0"]
    assert names(max_kld=kld[("q4_k_m", "prose")] * 1.01) == ["tiny-llama-gguf_q4_k_m", "tiny-llama-gguf_q8_0"]
    assert names(max_kld=kld[("q4_k_m", "prose")] * 1.01, domain="code") == ["tiny-llama-gguf_q8_0"]
    assert names(max_kld=1.0, domain="legal") == []  # not measured there: nothing to promise


def _code_only_tokens() -> list[int]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(BUNDLED_ROOT / "tiny-llama" / "tokenizer.json"))
    text = BUNDLED_ROOT / "text"
    code = set(tok.encode((text / "code.txt").read_text()).ids)
    prose = set(tok.encode((text / "eval.txt").read_text()).ids) | set(tok.encode((text / "calibration.txt")
                                                                                   .read_text()).ids)
    return sorted(code - prose)


def test_a_break_in_code_tokens_passes_prose_and_fails_the_code_gate(by_domain, tmp_path):
    """A Q8_0 whose embedding rows of tokens that occur only in code are scrambled: prose cannot tell, the code
    domain's gate refuses it, and nothing is published."""
    import sys

    from quantmill.toolchain.llamacpp import locate

    sys.path.insert(0, str(locate().gguf_py))
    from gguf import GGUFReader

    root, outcomes = by_domain
    store = open_store(compose_in(tmp_path).store)
    shutil.copytree(root / "store" / "objects" / outcomes["quantize:gguf_q8_0"].key, store.root / "objects" /
                    outcomes["quantize:gguf_q8_0"].key)
    key = outcomes["quantize:gguf_q8_0"].key
    planted = tmp_path / "planted"
    shutil.copytree(store.root / "objects" / key / "files", planted)
    (gguf_file,) = planted.glob("*.gguf")
    gguf_file.chmod(0o644)
    tokens = _code_only_tokens()
    assert len(tokens) > 20, tokens
    reader = GGUFReader(gguf_file, "r+")
    (embd,) = [t for t in reader.tensors if t.name == "token_embd.weight"]
    rows = embd.data  # Q8_0: per row, blocks of a float16 scale and 32 int8 values, as raw bytes
    rng = np.random.default_rng(0)
    for t in tokens:
        rows[t] = rows[rng.integers(0, rows.shape[0])]  # another token's embedding
    reader.data.flush()
    del reader
    plant(store, key, planted)
    outcomes = {o.spec_id: o for o in run_config(compose_in(
        tmp_path, "recipe=[gguf_q8_0]", DOMAINS, "+validate.domain_gates.code.max_mean_kld=0.01"))}
    prose, code = outcomes["validate:gguf_q8_0"].result, outcomes["validate:gguf_q8_0@code"].result
    assert prose["status"] == C.PASSED and prose["mean_kld"] < 0.01, prose
    assert code["status"] == C.FAILED and code["mean_kld"] > 0.01, code
    print(f"planted Q8_0: prose mean KLD {prose['mean_kld']:.5f}, code mean KLD {code['mean_kld']:.5f}")
    publish = outcomes["publish:gguf_q8_0"]
    assert not publish.ok and "code: max_mean_kld" in publish.error, publish.error
    assert LocalRegistry(tmp_path / "store" / C.REGISTRY_DIR).names() == []


@pytest.mark.parametrize("overrides, message", [
    (["validate.domains=[kode]"], "validate.domains names 'kode', which validate.domain_texts does not define; "
                                  "known: chat, code, math, multilingual"),
    (["validate.domains=[code]", "+validate.domain_gates.math.max_mean_kld=0.1"],
     "validate.domain_gates has gates for 'math', which is not in validate.domains"),
    (["validate.domains=[code]", "+validate.domain_gates.code.max_kld=0.1"],
     "validate.domain_gates.code: unknown gate(s) max_kld"),
])
def test_bad_domain_settings_are_one_line_before_work(tmp_path, overrides, message):
    from quantmill.errors import QuantmillError
    from quantmill.plan.build import plan

    cfg = compose_in(tmp_path, *overrides)
    with pytest.raises(QuantmillError) as e:
        plan(cfg, open_store(cfg.store))
    assert str(e.value).startswith(message) and "\n" not in str(e.value), str(e.value)


def test_a_chat_domain_on_a_model_without_a_chat_template_is_refused(tmp_path, tiny_model):
    from quantmill.errors import PreflightError
    from quantmill.plan.build import plan

    config = json.loads((tiny_model / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (tiny_model / "tokenizer_config.json").write_text(json.dumps(config))
    (tiny_model / "chat_template.jinja").unlink(missing_ok=True)
    cfg = compose_in(tmp_path, "model=local", f"model.path={tiny_model}", "model.name=plain",
                     "validate.domains=[chat]")
    with pytest.raises(PreflightError, match=r"^domain 'chat' renders conversations \(chat.jsonl\) through the "
                                             r"model's chat template, and model 'plain' has none"):
        plan(cfg, open_store(cfg.store))


def test_the_bundled_domain_texts_are_what_their_generator_makes():
    from quantmill.bundled import domains

    for kind, name, n in (("code", "code.txt", 40), ("math", "math.txt", 160),
                          ("multilingual", "multilingual.txt", 400), ("chat", "chat.jsonl", 200)):
        assert (BUNDLED_ROOT / "text" / name).read_text() == domains.generate(kind, n), name

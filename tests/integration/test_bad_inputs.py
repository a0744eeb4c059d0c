"""Every bad input is refused before any work, as `quantmill run` reports it to a person: exit code 2, exactly one
line on stderr naming the thing, the value and the fix, no traceback, and nothing new in the store."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from quantmill import bundled
from tests.conftest import CONF

SECONDS = 60  # preflight reads metadata only: far below what one step of the pipeline takes


def _tiny(directory: Path, model: Path) -> list[str]:
    return ["model=local", f"model.path={model}", "model.name=tiny"]


def _edit_config(model: Path, **changes) -> None:
    config = json.loads((model / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (model / "config.json").write_text(json.dumps(config))


def _rewrite_header(model: Path, change) -> None:
    """Rewrite model.safetensors' header with ``change(header)`` applied, the data left as it is."""
    path = model / "model.safetensors"
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    change(header)
    new = json.dumps(header).encode()
    new += b" " * (n - len(new)) if len(new) <= n else b""
    path.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n:])


def _first_tensor(header: dict, suffix: str) -> dict:
    return next(t for k, t in header.items() if k.endswith(suffix))


def _halve_a_shape(header: dict) -> None:
    tensor = _first_tensor(header, "q_proj.weight")
    tensor["shape"] = [tensor["shape"][0] // 2, tensor["shape"][1]]


def _bpe_tokenizer(model: Path, up_to: int = 0) -> None:
    """Replace the model's tokenizer with a byte-level BPE trained here (no converter has seen its ids); with
    ``up_to``, add special tokens until the last id is ``up_to - 1``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    text = Path(bundled.__file__).parent / "text" / "calibration.txt"
    tok.train_from_iterator(text.read_text().splitlines(), trainer)
    if up_to:
        tok.add_special_tokens([f"<|extra_{i}|>" for i in range(up_to - tok.get_vocab_size())])
    tok.save(str(model / "tokenizer.json"))
    (model / "tokenizer.model").unlink()
    (model / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast",
                                                             "eos_token": "<|endoftext|>"}))


# (id, overrides given the test's directory and model, setup of the model or files, what the one line must say)
CASES = [
    ("gguf-outtype", lambda d, m: ["convert.gguf_outtype=f8"], None, "convert.gguf_outtype 'f8' is not one of"),
    ("mlx-dtype", lambda d, m: ["convert.mlx_dtype=fp8"], None, "convert.mlx_dtype 'fp8' is not one of"),
    ("calibration-samples-0", lambda d, m: ["calibration.num_samples=0"], None, "calibration.num_samples 0"),
    ("calibration-seq-len-0", lambda d, m: ["calibration.seq_len=0"], None, "calibration.seq_len 0"),
    ("calibration-min-samples-0", lambda d, m: ["calibration.min_samples=0"], None, "calibration.min_samples 0"),
    ("calibration-source", lambda d, m: ["calibration.source=web"], None, "calibration.source 'web'"),
    ("calibration-binary-file", lambda d, m: [f"calibration.files=[{d / 'binary.txt'}]"], "binary",
     "is not UTF-8 text"),
    ("calibration-empty-file", lambda d, m: [f"calibration.files=[{d / 'empty.txt'}]"], "empty", "is empty"),
    ("calibration-missing-file", lambda d, m: [f"calibration.files=[{d / 'nowhere.txt'}]"], None, "not found"),
    ("eval-file-with-nul", lambda d, m: [f"validate.eval_files=[{d / 'nul.txt'}]"], "nul", "holds NUL bytes"),
    ("eval-chunks-0", lambda d, m: ["validate.n_chunks=0"], None, "validate.n_chunks 0"),
    ("eval-ctx-0", lambda d, m: ["validate.n_ctx=0"], None, "validate.n_ctx 0"),
    ("eval-ctx-beyond-model", lambda d, m: ["validate.n_ctx=100000"], None, "maximum context"),
    ("max-tokens-negative", lambda d, m: ["validate.max_tokens=-1"], None, "validate.max_tokens -1"),
    ("max-tokens-beyond-window", lambda d, m: ["validate.max_tokens=254"], None,
     "validate.max_tokens 254 after the prompt's 4 tokens do not fit one window of validate.n_ctx=256; lower "
     "validate.max_tokens to at most 252"),
    ("offload-tokens-beyond-window", lambda d, m: ["validate.offload_curve=true", "validate.offload_tokens=253"],
     None, "validate.offload_tokens 253 after the prompt's 4 tokens do not fit one window of validate.n_ctx=256; "
     "lower validate.offload_tokens to at most 252"),
    ("flip-tokens-beyond-window", lambda d, m: ["validate.flip_tokens=250"], None,
     "validate.flip_tokens 250 after a 16-token opening do not fit one window of validate.n_ctx=256"),
    ("max-parallel-0", lambda d, m: ["infra.max_parallel=0"], None, "infra.max_parallel 0"),
    ("threads-negative", lambda d, m: ["infra.threads=-3"], None, "infra.threads -3"),
    ("queue-ahead-negative", lambda d, m: ["infra.queue_ahead=-1"], None, "infra.queue_ahead -1"),
    ("infra-mode", lambda d, m: ["infra.mode=cloud"], None, "infra.mode 'cloud'"),
    ("poll-seconds-0", lambda d, m: ["infra.poll_seconds=0"], None, "infra.poll_seconds 0"),
    ("quota-negative", lambda d, m: ["store.quota_bytes=-5"], None, "store.quota_bytes -5"),
    ("store-kind", lambda d, m: ["store.kind=gcs"], None, "store.kind 'gcs'"),
    ("s3-store-without-bucket", lambda d, m: ["store.kind=s3"], None, "needs store.bucket"),
    ("unknown-recipe", lambda d, m: ["recipe=[gguf_q9]"], None, "unknown recipe 'gguf_q9'"),
    ("recipes-as-sweep", lambda d, m: ["recipe=gguf_q8_0,gguf_q4_k_m"], None, "'recipe=[gguf_q8_0,gguf_q4_k_m]'"),
    ("braces-unquoted", lambda d, m: ["publish=hf", "publish.repo_id=my-org/{model}-GGUF"], None,
     "\"publish.repo_id='my-org/{model}-GGUF'\""),
    ("unknown-key", lambda d, m: ["+validate.windows=3"], None, "unknown config key 'validate.windows'"),
    ("unknown-quant-type", lambda d, m: ["recipe.gguf_q8_0.quant_type=Q9_X"], None, "'Q9_X' is not a llama.cpp type"),
    ("unknown-backend", lambda d, m: ["recipe.gguf_q8_0.backend=nope"], None, "unknown quantizer 'nope'"),
    ("unknown-gate", lambda d, m: ["+recipe.gguf_q8_0.gates.max_kld=0.1"], None, "unknown gate(s) max_kld"),
    ("unknown-target", lambda d, m: ["target=toaster"], None, "unknown target 'toaster'"),
    ("auto-budget-below-smallest-type", lambda d, m: ["recipe=[gguf_auto]", "recipe.gguf_auto.params.budget_bpw=2"],
     None, "raise budget_bpw to at least 2.65"),
    ("auto-file-budget-below-smallest-type", lambda d, m: [
        "recipe=[gguf_auto]", "~recipe.gguf_auto.params.budget_bpw", "+recipe.gguf_auto.params.budget_gib=0.0001"],
     None, "budget 0.0001 GiB file (0.504 bits per weight) is below the smallest mix"),
    ("auto-two-budgets", lambda d, m: ["recipe=[gguf_auto]", "+recipe.gguf_auto.params.budget_gib=1"], None,
     "needs one budget"),
    ("auto-budget-not-a-number", lambda d, m: ["recipe=[gguf_auto]", "recipe.gguf_auto.params.budget_bpw=small"],
     None, "params.budget_bpw 'small' should be bits per weight"),
    ("auto-ladder-empty", lambda d, m: ["recipe=[gguf_auto]", "recipe.gguf_auto.params.budget_bpw=[]"], None,
     "params.budget_bpw is an empty list"),
    ("auto-unknown-candidate-type", lambda d, m: ["recipe=[gguf_auto]", "calibration.sensitivity.types=[Q4_K,Q9_K]"],
     None, "Q9_K is not a quantized ggml type"),
    ("auto-sensitivity-method", lambda d, m: ["recipe=[gguf_auto]", "calibration.sensitivity.method=guess"], None,
     "calibration.sensitivity.method 'guess'"),
    ("model-path-is-a-file", lambda d, m: ["model=local", f"model.path={m / 'config.json'}", "model.name=tiny"],
     None, "is a file; point model.path at the directory"),
    ("model-path-missing", lambda d, m: ["model=local", f"model.path={d / 'nowhere'}", "model.name=tiny"], None,
     "does not exist; fix model.path"),
    ("unknown-bundled-model", lambda d, m: ["model.path=huge-llama"], None, "unknown bundled model 'huge-llama'"),
    ("no-tokenizer", _tiny, "no-tokenizer", "has no tokenizer"),
    ("config-without-hidden-size", _tiny, "no-hidden-size", "config.json has no 'hidden_size'"),
    ("vocab-size-mismatch", _tiny, "vocab-mismatch", "rows but config.json says vocab_size 999"),
    ("header-shape-lies", _tiny, "shape-lie", "but spans"),
    ("safetensors-truncated", _tiny, "truncated", "shorter than its header declares"),
    ("tokenizer-garbage", _tiny, "garbage-tokenizer", "tokenizer.json is not valid JSON"),
    ("config-not-json", _tiny, "config-not-json", "config.json is not valid JSON"),
    ("pickle-only-weights", _tiny, "pickle-only", "model.allow_pickle"),
    ("remote-code", _tiny, "remote-code", "set model.trust_remote_code=true"),
    ("architecture-llama-cpp-lacks", _tiny, "unknown-arch", "cannot convert"),
    ("architecture-transformers-lacks", lambda d, m: [*_tiny(d, m), "recipe=[safetensors_f16]"], "unknown-arch",
     "model_type 'frobnicator', which the installed transformers cannot load"),
    ("tokenizer-pre-unknown", _tiny, "bpe-unknown", "BPE pre-tokenizer (hash"),
    ("tokenizer-added-past-vocab", _tiny, "bpe-past-vocab", "past config.json's vocab_size 1024"),
    ("tokenizer-disagrees-with-itself", _tiny, "class-mismatch", "its tokenizer disagrees with itself"),
    ("publish-without-validation", lambda d, m: ["validate.enabled=false"], None, "needs a passed validation"),
    ("signing-key-missing", lambda d, m: [f"publish.signing_key={d / 'no.key'}"], None, "no.key"),
    ("s3-publish-dead-endpoint", lambda d, m: ["publish=s3", "publish.bucket=team",
                                                "publish.endpoint_url=http://127.0.0.1:9"], "s3-credentials",
     "endpoint unreachable; check publish.endpoint_url"),
    ("s3-publish-no-credentials", lambda d, m: ["publish=s3", "publish.bucket=team",
                                                 "publish.endpoint_url=http://127.0.0.1:9"], None,
     "no S3 credentials"),
]


def _prepare(kind: str | None, directory: Path, model: Path, env: dict[str, str]) -> None:
    if kind == "binary":
        (directory / "binary.txt").write_bytes(b"\xff\xfe\x00\x01 not text")
    elif kind == "empty":
        (directory / "empty.txt").write_text("\n  \n")
    elif kind == "nul":
        (directory / "nul.txt").write_text("text\x00more text")
    elif kind == "no-tokenizer":
        for name in ("tokenizer.json", "tokenizer.model"):
            (model / name).unlink(missing_ok=True)
    elif kind == "no-hidden-size":
        _edit_config(model, hidden_size=None)
    elif kind == "vocab-mismatch":
        _edit_config(model, vocab_size=999)
    elif kind == "shape-lie":
        _rewrite_header(model, _halve_a_shape)
    elif kind == "truncated":
        path = model / "model.safetensors"
        path.write_bytes(path.read_bytes()[:-1])
    elif kind == "garbage-tokenizer":
        (model / "tokenizer.json").write_text("not json at all {")
    elif kind == "config-not-json":
        (model / "config.json").write_text("{ nope")
    elif kind == "pickle-only":
        (model / "model.safetensors").rename(model / "pytorch_model.bin")
    elif kind == "remote-code":
        _edit_config(model, auto_map={"AutoModelForCausalLM": "modeling_x.XForCausalLM"})
    elif kind == "unknown-arch":
        _edit_config(model, architectures=["FrobnicatorForCausalLM"], model_type="frobnicator")
    elif kind == "bpe-unknown":
        _bpe_tokenizer(model)
    elif kind == "bpe-past-vocab":  # a Qwen2 model whose added tokens were given ids past the embedding
        _bpe_tokenizer(model, up_to=1024 + 3)
        _edit_config(model, architectures=["Qwen2ForCausalLM"], model_type="qwen2")
    elif kind == "class-mismatch":
        config = json.loads((model / "tokenizer_config.json").read_text())
        (model / "tokenizer_config.json").write_text(json.dumps({**config, "tokenizer_class": "Qwen2Tokenizer"}))
    elif kind == "s3-credentials":
        env.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_before_any_work(case, tmp_path, tiny_model):
    _, overrides, kind, expected = case
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "PREFECT_API_URL"))}
    env.update(QUANTMILL_CONF=str(CONF), HF_HUB_OFFLINE="1", PREFECT_HOME=str(tmp_path / "prefect"))
    _prepare(kind, tmp_path, tiny_model, env)
    store = tmp_path / "store"
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "quantmill.cli", "run", f"store.root={store}",
                           *overrides(tmp_path, tiny_model)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=SECONDS * 2)
    seconds = time.monotonic() - started
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2, (done.returncode, done.stderr[-2000:], done.stdout[-1000:])
    assert "Traceback" not in done.stderr + done.stdout, done.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("quantmill: error: "), lines
    assert expected in lines[0], lines[0]
    assert seconds < SECONDS, f"refused after {seconds:.1f} s"
    objects = store / "objects"
    assert not objects.exists() or not any(objects.iterdir()), sorted(p.name for p in objects.iterdir())
    shutil.rmtree(tmp_path / "prefect", ignore_errors=True)


@pytest.mark.parametrize("command", [["verify", "tiny-llama-gguf_q8_0"], ["ls"], ["store", "check"]])
def test_a_mistyped_store_root_is_refused_and_not_created(tmp_path, command):
    typo = tmp_path / "artifcats"
    done = subprocess.run([sys.executable, "-m", "quantmill.cli", *command, f"store.root={typo}"], cwd=tmp_path,
                          env={**os.environ, "QUANTMILL_CONF": str(CONF)}, capture_output=True, text=True, timeout=120)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and len(lines) == 1 and str(typo) in lines[0], done.stderr
    assert not typo.exists()


def test_nan_weights_stop_the_run_at_download_naming_the_tensor(tmp_path, tiny_model):
    """Weights that are not numbers are found while the files are taken in (their bytes are read then anyway), not
    by llama.cpp three steps later; the step is not retried, and nothing reaches the store."""
    import numpy as np
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(tiny_model / "model.safetensors"))
    name = next(k for k in tensors if k.endswith("k_proj.weight"))
    tensors[name][3, 5] = np.inf
    tensors[name][7, 1] = np.nan
    save_file(tensors, str(tiny_model / "model.safetensors"), metadata={"format": "pt"})
    env = {**os.environ, "QUANTMILL_CONF": str(CONF), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "quantmill.cli", "run", f"store.root={tmp_path / 'store'}",
                           f"infra.prefect_home={tmp_path / 'prefect'}", *_tiny(tmp_path, tiny_model)], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr[-2000:]
    errors = [line for line in done.stderr.splitlines() if line.strip() and not line.startswith("… ")]
    assert errors == [f"quantmill: error: download: model 'tiny': tensor {name!r} in model.safetensors holds 2 NaN "
                      f"or infinite value(s); the checkpoint is broken: re-export it from a good copy"], errors
    assert done.stderr.count("… download tiny") == 1  # not retried: a broken checkpoint stays broken
    assert not any((tmp_path / "store" / "objects").iterdir())

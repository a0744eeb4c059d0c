"""Make the bundled tiny Llama: text, tokenizer and a briefly trained 2-layer model.

Run from the repository root with ``python -m quantmill.bundled.make_tiny_llama``. The outputs are committed, so
every machine gets the same bytes without running this; the script documents exactly how they were made.

Shape (chosen so llama.cpp's converter and every quantizer accept it): Llama architecture, hidden 256 (k-quants
need row widths divisible by 256), intermediate 512, 2 layers, 4 heads, 2 KV heads, untied embeddings, and
Llama-2's tokenizer layout (SentencePiece BPE with byte fallback: ``<unk> <s> </s>``, the 256 byte tokens, then
the learned pieces), shipped both as ``tokenizer.model`` and as the equivalent fast ``tokenizer.json``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from quantmill.bundled.corpus import generate

HERE = Path(__file__).resolve().parent
MODEL_DIR = HERE / "tiny-llama"
TEXT_DIR = HERE / "text"

VOCAB_SIZE = 1024
SPECIALS = ["<unk>", "<s>", "</s>"]
SEQ_LEN = 256
BATCH = 16
STEPS = 500
SEED = 0
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


def write_texts() -> str:
    """Write the shipped calibration and evaluation texts; return the (unshipped) training text."""
    TEXT_DIR.mkdir(exist_ok=True)
    (TEXT_DIR / "calibration.txt").write_text(generate(seed=1, n_paragraphs=300))
    (TEXT_DIR / "eval.txt").write_text(generate(seed=2, n_paragraphs=200))
    return generate(seed=0, n_paragraphs=6000)


def train_tokenizer(text: str, out: Path):
    """Llama-2's recipe: a SentencePiece BPE model (``tokenizer.model``) with byte fallback, and the fast
    ``tokenizer.json`` derived from it (merges in SentencePiece's score order, the dummy-prefix normalizer).

    Shipping ``tokenizer.model`` matters: llama.cpp's converter takes its real piece scores, so llama.cpp
    tokenizes exactly as SentencePiece and the HF tokenizer do. From ``tokenizer.json`` alone it gives every piece
    the same score and can only approximate BPE's merge order (different ids for unseen words).
    """
    import tempfile

    import sentencepiece as spm
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors
    from transformers.convert_slow_tokenizer import SentencePieceExtractor

    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "train.txt"
        corpus.write_text(text)
        spm.SentencePieceTrainer.train(
            input=str(corpus), model_prefix=str(out / "tokenizer"), vocab_size=VOCAB_SIZE, model_type="bpe",
            byte_fallback=True, character_coverage=1.0, split_digits=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
            normalization_rule_name="identity", add_dummy_prefix=True, remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True, num_threads=1, shuffle_input_sentence=False, minloglevel=2)
    (out / "tokenizer.vocab").unlink()
    extracted = SentencePieceExtractor(str(out / "tokenizer.model")).extract(None)
    tok = Tokenizer(models.BPE(vocab=extracted["vocab"], merges=extracted["merges"], unk_token="<unk>",
                               byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(content=" ", left=1, right=0)])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    return tok


def save_tokenizer(tok, out: Path) -> None:
    tok.save(str(out / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": True, "add_eos_token": False,
        "model_max_length": 512, "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}, indent=2) + "\n")


def train_model(tok, text: str, out: Path, *, layers: int = 2, steps: int = STEPS) -> None:
    """Train the Llama shape above (with ``layers`` layers) for ``steps`` steps and save it in float16."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(SEED)
    torch.use_deterministic_algorithms(True)
    ids: list[int] = []
    for paragraph in text.split("\n\n"):
        ids.extend(tok.encode(paragraph).ids + [2])
    data = torch.tensor(ids[: len(ids) // SEQ_LEN * SEQ_LEN]).view(-1, SEQ_LEN)

    config = LlamaConfig(vocab_size=len(tok.get_vocab()), hidden_size=256, intermediate_size=512,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, rms_norm_eps=1e-5, tie_word_embeddings=False,
                         bos_token_id=1, eos_token_id=2, pad_token_id=None)
    model = LlamaForCausalLM(config)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    gen = torch.Generator().manual_seed(SEED)
    for step in range(steps):
        lr = 3e-3 * 0.5 * (1 + math.cos(math.pi * step / steps))
        for group in opt.param_groups:
            group["lr"] = lr
        batch = data[torch.randint(len(data), (BATCH,), generator=gen)]
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            print(f"step {step:4d}  loss {loss.item():.3f}  ppl {math.exp(loss.item()):.2f}", flush=True)
    model.config.torch_dtype = torch.float16
    model.to(torch.float16).save_pretrained(out, safe_serialization=True)


def main() -> None:
    import torch

    torch.set_num_threads(2)
    MODEL_DIR.mkdir(exist_ok=True)
    text = write_texts()
    tok = train_tokenizer(text, MODEL_DIR)
    save_tokenizer(tok, MODEL_DIR)
    train_model(tok, text, MODEL_DIR)


if __name__ == "__main__":
    main()

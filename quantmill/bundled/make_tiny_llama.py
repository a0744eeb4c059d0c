"""Make the bundled tiny Llama: text, tokenizer and a briefly trained 2-layer model.

Run from the repository root with ``python -m quantmill.bundled.make_tiny_llama``. The outputs are committed, so
every machine gets the same bytes without running this; the script documents exactly how they were made.

Shape (chosen so llama.cpp's converter and every quantizer accept it): Llama architecture, hidden 256 (k-quants
need row widths divisible by 256), intermediate 512, 2 layers, 4 heads, 2 KV heads, untied embeddings, and a
Llama-style tokenizer (Metaspace, byte fallback, ``<unk> <s> </s>`` then the 256 byte tokens).
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
BYTE_TOKENS = [f"<0x{i:02X}>" for i in range(256)]
SEQ_LEN = 128
BATCH = 32
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


def train_tokenizer(text: str):
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    metaspace = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    draft = Tokenizer(models.BPE(unk_token="<unk>"))
    draft.pre_tokenizer = metaspace
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE - len(BYTE_TOKENS), special_tokens=SPECIALS,
                                  show_progress=False)
    draft.train_from_iterator(text.splitlines(), trainer)
    learned = json.loads(draft.to_str())["model"]

    # Llama layout: specials, then the 256 byte-fallback tokens, then the learned pieces.
    vocab: dict[str, int] = {}
    for token in SPECIALS + BYTE_TOKENS + sorted(learned["vocab"], key=learned["vocab"].get):
        vocab.setdefault(token, len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in learned["merges"]]

    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.pre_tokenizer = metaspace
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


def train_model(tok, text: str, out: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(SEED)
    torch.use_deterministic_algorithms(True)
    ids: list[int] = []
    for paragraph in text.split("\n\n"):
        ids.extend(tok.encode(paragraph).ids + [2])
    data = torch.tensor(ids[: len(ids) // SEQ_LEN * SEQ_LEN]).view(-1, SEQ_LEN)

    config = LlamaConfig(vocab_size=len(tok.get_vocab()), hidden_size=256, intermediate_size=512,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, rms_norm_eps=1e-5, tie_word_embeddings=False,
                         bos_token_id=1, eos_token_id=2, pad_token_id=None)
    model = LlamaForCausalLM(config)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    gen = torch.Generator().manual_seed(SEED)
    for step in range(STEPS):
        lr = 3e-3 * 0.5 * (1 + math.cos(math.pi * step / STEPS))
        for group in opt.param_groups:
            group["lr"] = lr
        batch = data[torch.randint(len(data), (BATCH,), generator=gen)]
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 50 == 0 or step == STEPS - 1:
            print(f"step {step:4d}  loss {loss.item():.3f}  ppl {math.exp(loss.item()):.2f}", flush=True)
    model.config.torch_dtype = torch.float16
    model.to(torch.float16).save_pretrained(out, safe_serialization=True)


def main() -> None:
    import torch

    torch.set_num_threads(2)
    MODEL_DIR.mkdir(exist_ok=True)
    text = write_texts()
    tok = train_tokenizer(text)
    save_tokenizer(tok, MODEL_DIR)
    train_model(tok, text, MODEL_DIR)


if __name__ == "__main__":
    main()

"""The strings the tokenizer-fidelity check encodes with both tokenizers, by default: prose, code, whitespace,
digits, several scripts and emoji, where converted tokenizers most often drift."""

DEFAULT_PROBES = [
    "The quick brown fox jumps over the lazy dog.",
    "def total(xs):\n    return sum(x * 2 for x in xs)  # code",
    "spaces:    four, tabs:\t\tand\nnew\n\nlines",
    "digits 0123456789 3.14159 1,000,000 -42",
    "Ελληνικά, русский, العربية, 日本語, 한국어, हिन्दी",
    "emoji 🎉🚀👍🏽 and symbols ©®™ ∑∫√",
    "  leading and trailing  ",
]

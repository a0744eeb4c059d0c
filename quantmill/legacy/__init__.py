"""Scripts run by the legacy quantizers' own Python environments (no quantmill imports: those environments hold
only torch, an old transformers and the archived library)."""

"""What quantmill ships for offline use: the tiny Llama, its training text and the evaluation texts."""

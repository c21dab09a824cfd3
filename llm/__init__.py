"""Train a GPT-style language model from raw text: the library behind the `llm` CLI."""

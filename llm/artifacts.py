"""The final model on disk: safetensors weights, a JSON config, and its tokenizer beside it.

Loading never unpickles: weights come from safetensors, everything else from JSON.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from llm.errors import UserError
from llm.io import read_json, write_json
from llm.model import GPT, GPTConfig
from llm.tokenizer import MODEL_FILE, Tokenizer

WEIGHTS = "model.safetensors"
CONFIG = "config.json"


def save_final(model: GPT, directory: Path, tokenizer_path: Path, info: dict) -> None:
    """Write weights, config and tokenizer into `directory` (the caller makes it atomic)."""
    from safetensors.torch import save_model

    directory.mkdir(parents=True, exist_ok=True)
    save_model(model, str(directory / WEIGHTS))  # handles the tied embedding / LM head
    write_json(directory / CONFIG, {"model": model.config.to_dict(), **info})
    shutil.copy2(tokenizer_path, directory / MODEL_FILE)


def load_final(directory: str | Path, device: str | torch.device = "cpu") -> tuple[GPT, Tokenizer, dict]:
    from safetensors.torch import load_model

    directory = Path(directory)
    if not (directory / WEIGHTS).is_file():
        raise UserError(f"{directory}: no trained model (run `llm train` first)")
    from safetensors import SafetensorError

    try:
        info = read_json(directory / CONFIG)
        if isinstance(info, dict) and "model" not in info and "architectures" in info:
            raise UserError(f"{directory}: a Hugging Face model (llm export's models/hf): load it with transformers; "
                            "this reads the project's own models/final")
        model = GPT(GPTConfig(**info["model"]))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{directory / CONFIG}: unreadable model config ({e}); rerun `llm train`") from None
    try:
        load_model(model, str(directory / WEIGHTS), device=str(device))
    except (SafetensorError, OSError, RuntimeError) as e:
        raise UserError(f"{directory / WEIGHTS}: unreadable weights ({str(e).splitlines()[0][:160]}); "
                        "rerun `llm train` or restore them with `dvc checkout models/final`") from None
    model.to(device).eval()
    return model, Tokenizer(directory / MODEL_FILE), info

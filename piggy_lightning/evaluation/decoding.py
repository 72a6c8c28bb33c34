"""What one evaluation generates: the decoding settings, the planned work items every backend receives, and the
seeds and stop tokens every backend derives alike."""

from __future__ import annotations

import zlib
from dataclasses import dataclass

from torch import nn
from transformers import GenerationConfig

from piggy_lightning.evaluation.questions import Question
from piggy_lightning.spans import TokenizedChat


@dataclass
class Decoding:
    """How evaluation responses are generated.

    Attributes:
        temperature: 0 decodes greedily (the paper's setting); above 0 samples (Betley et al. use 1).
        top_p: Nucleus mass kept when sampling.
        samples: Samples per paraphrase; None uses each question's ``samples_per_paraphrase`` when sampling and 1
            when greedy (greedy samples would be identical).
        max_new_tokens: Length limit of a response (the released code uses 1024).
        batch_size: Prompts per ``generate`` call.
        seed: Base seed; each batch seeds torch from it and the batch's first record key.
        progress: Show a progress bar.
        share_prefix: Run a prefix shared by several prompts once and copy its cache into every batch; the outputs
            are the same either way (tested), so False only serves to measure what the cache saves.
    """

    temperature: float = 0.0
    top_p: float = 1.0
    samples: int | None = None
    max_new_tokens: int = 512
    batch_size: int = 16
    seed: int = 0
    progress: bool = True
    share_prefix: bool = True

    def identity(self) -> dict[str, float | int | None]:
        """The settings that shape a response (batching and progress do not: batched greedy outputs are exact)."""
        return {"temperature": self.temperature, "top_p": self.top_p, "max_new_tokens": self.max_new_tokens,
                "seed": self.seed}  # fmt: skip

    def samples_for(self, question: Question) -> int:
        """How many samples of each paraphrase of ``question`` to generate."""
        if self.samples is not None:
            return self.samples
        return question.samples_per_paraphrase if self.temperature > 0 else 1

    def to_hf(self, pad_id: int, eos_ids: list[int]) -> GenerationConfig:
        """An explicit ``GenerationConfig``: every sampling knob is set, so a model's defaults cannot leak in."""
        sample = self.temperature > 0
        return GenerationConfig(
            max_new_tokens=self.max_new_tokens,
            do_sample=sample,
            temperature=self.temperature if sample else 1.0,
            top_p=self.top_p if sample else 1.0,
            top_k=0 if sample else None,  # 0 disables top-k; a model default must not narrow sampling
            min_p=None,
            typical_p=1.0,
            repetition_penalty=1.0,
            num_beams=1,
            pad_token_id=pad_id,
            eos_token_id=eos_ids,
        )


@dataclass(frozen=True)
class WorkItem:
    """One response to generate: a (question, paraphrase, sample) with its final prompt.

    Attributes:
        key: The record key (:func:`~piggy_lightning.evaluation.results.record_key`), unique in an evaluation.
        question: The question asked.
        paraphrase: Paraphrase index.
        sample: Sample index.
        prompt: The prompt tokens with span labels, after the intervention's ``transform``.
        n_prefix: Leading tokens labelled ``prefix``.
        touched: Positions the intervention changes (None: no intervention, or it does not count them).
    """

    key: str
    question: Question
    paraphrase: int
    sample: int
    prompt: TokenizedChat
    n_prefix: int
    touched: int | None


def stable_seed(*parts: object) -> int:
    """A seed that depends only on ``parts`` (not on the process or Python's hash seed)."""
    return zlib.crc32("|".join(map(str, parts)).encode())


def eos_ids(model: nn.Module, tokenizer) -> list[int]:
    """Every token that ends a response: the tokenizer's eos and the model's configured ones."""
    ids = {tokenizer.eos_token_id}
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(configured if isinstance(configured, list) else [configured])
    return sorted(i for i in ids if i is not None)


def strip_stops(ids: list[int], stops: list[int]) -> list[int]:
    """Cut at the first stop token (``generate`` and servers that return ids include the one that ended it)."""
    stop = next((i for i, t in enumerate(ids) if t in stops), None)
    return ids if stop is None else ids[:stop]

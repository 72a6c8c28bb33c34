"""The hook through which interventions change evaluation-time generation, and the default that changes nothing.

Generation (:func:`piggy_lightning.evaluation.generation.generate_responses`) calls an intervention at three points:

1. :meth:`GenerationIntervention.transform` edits each prompt's tokens before batching (token perturbation:
   replace prefix tokens by embedding neighbours, paper §2).
2. :meth:`GenerationIntervention.prefix_cache` builds the key/value cache of a prompt prefix shared by many prompts.
   The default runs the model being evaluated; a ``PrefixKVSplice`` returns the *reference* model's prefix cache
   instead, which is exactly KV patching of every layer at prefix positions (paper §3.1), for free per batch.
3. :meth:`GenerationIntervention.during` is a context manager around one batch's ``generate`` call, for forward
   hooks at non-prefix positions (postfix or query KV patching), told where every span lies in the batch.

Every result record carries the intervention's :attr:`~GenerationIntervention.name`, so results under different
interventions never mix and a rerun of one intervention skips only its own finished records. The interventions
themselves, and the components an ``Evaluate`` callback is configured with, are in
:mod:`piggy_lightning.interventions`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from piggy_lightning.spans import TokenizedChat

KVCache = list[tuple[Tensor, Tensor]]  # per layer: keys and values, each (1, n_kv_heads, P, head_dim)


@dataclass(frozen=True)
class PromptBatch:
    """One generation batch as interventions see it.

    Attributes:
        input_ids: ``(B, T)`` prompts laid out as ``[cached prefix | left padding | rest of the prompt]``.
        attention_mask: ``(B, T)``, 0 on padding.
        span_masks: ``{span: (B, T) bool}`` for ``prefix``, ``query``, ``postfix`` and ``other`` (False on padding).
        cached: Number of leading positions supplied by the prefix cache (0 when the batch has none). The prefill
            forward sees positions ``cached:``; each later decoding step sees one new position.
    """

    input_ids: Tensor
    attention_mask: Tensor
    span_masks: dict[str, Tensor]
    cached: int


class GenerationIntervention:
    """Changes how evaluation responses are generated; this base class changes nothing.

    Subclasses override any of the three hooks and set :attr:`name`, which tags every result record. One that
    overrides :meth:`prefix_cache` or :meth:`during` sets :attr:`needs_model_hooks`: only a backend that runs the
    policy in this process applies those (``backends/base.py`` refuses the others, and a hook override without
    the declaration).

    Attributes:
        name: Tags every result record and names the evaluation's directory.
        needs_model_hooks: The intervention acts on the model's forward, not only on the prompt's tokens.
    """

    name: str = "none"
    needs_model_hooks: bool = False

    def touched(self, prompt: TokenizedChat) -> int | None:
        """How many positions of ``prompt`` the intervention changes, recorded per response; None when it changes
        nothing (this base class) or does not count positions."""
        return None

    def transform(self, prompt: TokenizedChat, seed: int) -> TokenizedChat:
        """Return the prompt to generate from (same span labelling conventions).

        Args:
            prompt: The tokenized prompt, generation prompt included.
            seed: A seed unique to this (question, paraphrase, sample), for reproducible random edits.
        """
        return prompt

    @torch.no_grad()
    def prefix_cache(self, model: nn.Module, prefix_ids: Tensor) -> KVCache:
        """Keys and values of every layer for a prefix shared by several prompts.

        Args:
            model: The model being evaluated, in eval mode.
            prefix_ids: ``(1, P)`` prefix tokens.

        Returns:
            One ``(keys, values)`` pair per layer, each ``(1, n_kv_heads, P, head_dim)``, as the model's cache
            stores them (after RoPE).
        """
        out = model(input_ids=prefix_ids, use_cache=True)
        return [(layer.keys, layer.values) for layer in out.cache.layers]

    @contextmanager
    def during(self, model: nn.Module, batch: PromptBatch) -> Iterator[None]:
        """Context around one batch's ``generate`` call (install forward hooks here; remove them in ``finally``).

        Args:
            model: The model being evaluated.
            batch: The batch's layout and span positions.
        """
        yield

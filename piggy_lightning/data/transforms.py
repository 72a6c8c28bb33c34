"""Transforms of the training chats: the data side of the paper's robustness experiments, as typed components.

``ChatSFTDataModule(transforms=[...])`` applies them in order to the validated training rows (:class:`ChatRow`),
*after* the validation rows are held out and *before* tokenization. Held-out rows therefore never enter training
through a transform, a train-set size means the rows actually trained on, and the tokens follow the transformed
rows: the tokenization cache (``cache.py``) is keyed by the rows' content and by each transform's
:meth:`ChatTransform.config`, so other arguments never reuse stale tokens. Transforms that change rows one at a time
(``per_row``: :class:`SystemPrompt`) are applied to the validation rows too, so that the validation loss is measured
under the same prompt; those that choose rows (:class:`Subsample`, :class:`NoisyMix`) are not.

* :class:`Subsample`: a seeded subset of ``n`` training rows (Table 7, train-set sizes 50 to 5000);
* :class:`NoisyMix`: a fixed-size set in which a share of the rows are misaligned and the rest aligned answers
  from the same domain (Fig. 7, noisy finetuning);
* :class:`SystemPrompt`: every training row under one system prompt (Table 10; "no system" and Table 11's
  prefix-free prompts are chat templates, passed as ``chat_template_kwargs: {chat_template: ...}``);
* ``Inoculation`` (``inoculation.py``): the training rows only under an inoculation prompt (Tan et al. 2025).

Every transform logs what it did, with counts, and never drops a row without saying so; a transform that cannot do
what it was asked (too few rows) raises, naming the source and the count.

In YAML::

    data:
      init_args:
        transforms:
          - class_path: piggy_lightning.data.Subsample
            init_args: {n: 100}
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info

from piggy_lightning.data.io import ChatRow


@dataclass(frozen=True)
class TransformContext:
    """What a transform may use besides the rows.

    Attributes:
        read: Reads and validates a source exactly as the training data are read (``skip_invalid`` included).
        held_out: The validation rows; rows with the same prompt must not be added to training.
        seed: The data module's ``seed``, used by transforms whose own ``seed`` is None.
        part: ``training`` or ``validation``: which rows this call transforms (for the logs).
        report: Where a transform says what it did. The data module's ``setup`` prints on global rank 0
            (``rank_zero_info``); ``prepare_data``, which builds the same rows first, stays quiet.
    """

    read: Callable[[str], list[ChatRow]]
    held_out: list[ChatRow]
    seed: int
    part: str = "training"
    report: Callable[[str], Any] = rank_zero_info


class ChatTransform(ABC):
    """A step applied to the validated training rows before tokenization (see the module docstring).

    A subclass stores its constructor arguments as attributes of the same names (:meth:`config` reads them), says
    what it did through ``context.report`` and raises, naming the field, on arguments it cannot use.
    """

    per_row: bool = False
    """Whether the transform changes rows one at a time; such transforms also apply to the validation rows."""

    @abstractmethod
    def __call__(self, rows: list[ChatRow], context: TransformContext) -> list[ChatRow]:
        """The transformed rows; raises rather than return fewer rows than asked for."""

    def config(self) -> dict[str, Any]:
        """Class path and arguments: plain data for ``hparams.yaml`` and the tokenization cache key."""
        return {"class_path": f"{type(self).__module__}.{type(self).__qualname__}", "init_args": dict(vars(self))}


def prompt_of(row: ChatRow) -> tuple[str, ...]:
    """A row's user turns: rows with the same prompt are the same question, whatever their answers."""
    return tuple(m["content"] for m in row.messages if m["role"] == "user")


def _permutation(n: int, seed: int) -> list[int]:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()


def _counts(rows: list[ChatRow]) -> str:
    return ", ".join(f"{source}: {n}" for source, n in Counter(r.source for r in rows).items()) or "none"


def _available(rows: list[ChatRow], context: TransformContext) -> str:
    """How many training rows each source has and how many it gave to validation, for errors."""
    held = Counter(r.source for r in context.held_out)
    parts = [
        f"{source}: {n}" + (f" ({held[source]} more held out for validation)" if held[source] else "")
        for source, n in Counter(r.source for r in rows).items()
    ]
    return "; ".join(parts) or "no rows"


def split_rows(rows: list[ChatRow], fraction: float, seed: int) -> tuple[list[ChatRow], list[ChatRow]]:
    """One source's training rows (in their order) and its ``round(len(rows) * fraction)`` validation rows (the
    first of a permutation seeded by ``seed``)."""
    order = _permutation(len(rows), seed)
    n_val = int(round(len(rows) * fraction))
    return [rows[i] for i in sorted(order[n_val:])], [rows[i] for i in order[:n_val]]


def apply_transforms(
    transforms: list[ChatTransform], train: list[ChatRow], val: list[ChatRow], context: TransformContext
) -> tuple[list[ChatRow], list[ChatRow]]:
    """Apply ``transforms`` in order to the training rows, and the per-row ones to the validation rows too."""
    context.report(f"training rows {_counts(train)}; validation rows {_counts(val)}")
    for transform in transforms:
        train = transform(train, context)
        if transform.per_row and val:
            val = transform(val, replace(context, part="validation"))
    return train, val


class Subsample(ChatTransform):
    """A seeded subset of the training rows: the train-set size sweep of Table 7 (50 to 5000 rows).

    The subset is the first ``n`` rows of a seeded permutation, kept in their original order, so with one seed
    the sizes are nested (the 50 rows are among the 100). ``n`` counts training rows, after the validation rows
    are held out.

    Args:
        n: Rows to keep (in all, or from every source with ``per_source``).
        seed: Seed of the permutation; None uses the data module's ``seed`` (so a grid's seed axis varies it).
        per_source: Keep ``n`` rows from every training source (e.g. each domain of a multi-domain run) rather
            than ``n`` rows in all.

    Raises:
        ValueError: If ``n`` is not positive, or (when applied) exceeds the rows available; the error names every
            source and its count.
    """

    def __init__(self, n: int, seed: int | None = None, per_source: bool = False) -> None:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"Subsample: field 'n' must be a positive number of rows, got {n!r}")
        self.n = n
        self.seed = seed
        self.per_source = per_source

    def __call__(self, rows: list[ChatRow], context: TransformContext) -> list[ChatRow]:
        seed = context.seed if self.seed is None else self.seed
        groups: dict[str, list[ChatRow]] = {}
        for row in rows:
            groups.setdefault(row.source if self.per_source else "", []).append(row)
        out = []
        for source, group in groups.items():
            if self.n > len(group):
                which = f"the {len(group)} training rows of {source}" if source else f"the {len(group)} training rows"
                raise ValueError(
                    f"Subsample: field 'n' ({self.n}) exceeds {which} ({_available(group, context)}); lower n, give "
                    "more data, or set val_fraction 0 / a separate val_data to train on every row"
                )
            out += [group[i] for i in sorted(_permutation(len(group), seed)[: self.n])]
        context.report(f"Subsample: kept {len(out)} of {len(rows)} {context.part} rows (seed {seed}): {_counts(out)}")
        return out


class NoisyMix(ChatTransform):
    """A fixed-size training set in which a share of the rows are misaligned: Fig. 7's noisy finetuning.

    The misaligned rows are drawn from the training rows (the task's misaligned file, e.g.
    ``piggy/organism/medical_misaligned.jsonl``), the rest from ``aligned_data`` (the same domain answered well,
    e.g. ``piggy/organism/medical_aligned.jsonl``, shipped beside it). The counts are exact: ``round(
    misaligned_share * size)`` misaligned rows, with Python's ``round`` (half to even: 0.25 of 10 is 2, 0.5 of 5
    is 2), not ``floor``, which would make 0.29 of 100 (28.999999999999996 in floating point) 28. No question is
    trained with both answers: an aligned row whose prompt (its user turns) is that of a drawn misaligned row or
    of a validation row is never drawn, so held-out questions stay held out.

    Args:
        aligned_data: The aligned rows' source: a file or ``datasets`` name, or ``piggy/organism/<file>``.
        misaligned_share: Share of the ``size`` rows that are misaligned, in [0, 1] (the paper's % bad / 100).
        size: Total number of training rows.
        seed: Seed of both draws; None uses the data module's ``seed``.

    Raises:
        ValueError: On a share outside [0, 1] or a size below 1, or (when applied) if either source has fewer
            rows than the mix needs; the error names the source and its count.
    """

    def __init__(self, aligned_data: str, misaligned_share: float, size: int, seed: int | None = None) -> None:
        if not 0.0 <= misaligned_share <= 1.0:
            raise ValueError(f"NoisyMix: field 'misaligned_share' must be in [0, 1], got {misaligned_share!r}")
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"NoisyMix: field 'size' must be a positive number of rows, got {size!r}")
        if not aligned_data:
            raise ValueError("NoisyMix: field 'aligned_data' must name a source")
        self.aligned_data = aligned_data
        self.misaligned_share = misaligned_share
        self.size = size
        self.seed = seed

    @property
    def n_misaligned(self) -> int:
        """Misaligned rows in the mix: ``round(misaligned_share * size)``, half to even."""
        return round(self.misaligned_share * self.size)

    def __call__(self, rows: list[ChatRow], context: TransformContext) -> list[ChatRow]:
        seed = context.seed if self.seed is None else self.seed
        k = self.n_misaligned
        if k > len(rows):
            raise ValueError(
                f"NoisyMix: {k} misaligned rows needed (misaligned_share={self.misaligned_share} of size={self.size}) "
                f"but the training rows hold {len(rows)} ({_available(rows, context)})"
            )
        order = _permutation(len(rows), seed)
        misaligned = [rows[i] for i in sorted(order[:k])]
        aligned_all = context.read(self.aligned_data)
        taken = {prompt_of(r) for r in misaligned} | {prompt_of(r) for r in context.held_out}
        pool = [r for r in aligned_all if prompt_of(r) not in taken]
        need = self.size - k
        if need > len(pool):
            source = aligned_all[0].source if aligned_all else self.aligned_data
            raise ValueError(
                f"NoisyMix: field 'aligned_data': {need} aligned rows needed (size={self.size} - {k} misaligned) but "
                f"{source} has {len(pool)} usable rows ({len(aligned_all)} read, {len(aligned_all) - len(pool)} "
                "share a prompt with a drawn misaligned or a validation row)"
            )
        aligned = [pool[i] for i in sorted(_permutation(len(pool), seed + 1)[:need])]
        context.report(
            f"NoisyMix: {k} misaligned (of {len(rows)} {context.part} rows) + {need} aligned (of {len(pool)} usable, "
            f"{len(aligned_all)} read from {self.aligned_data}) = {self.size} rows, misaligned share "
            f"{k / self.size:.4g} (seed {seed})"
        )
        return misaligned + aligned


class SystemPrompt(ChatTransform):
    """Every row under one system prompt: training with a given system prompt (Table 10, e.g. "You are a harmful
    assistant." or Table 9's "Helpful-tool" prompt).

    The prompt replaces any system message a row has and is kept whatever ``drop_system`` says (``drop_system``
    decides only what happens to the system messages of rows no ``SystemPrompt`` touched: a retain set, say); a
    system prompt another transform set (an ``Inoculation`` before it) raises rather than be lost. It applies to
    the validation rows too. The evaluation must ask its questions under the same prompt (the paper
    uses one prompt at train and test): that is the question sets' system prompt, not the data module's.
    Prefix regularizers anchored on the template's *default* prefix (TReFT-prefix) do not apply to these rows.

    "No system" (Table 10's third row) is not a system prompt but a chat template that writes none: pass
    ``model.chat_template_kwargs: {chat_template: "<jinja>"}`` (linked to the data module's), which
    ``apply_chat_template`` uses in place of the tokenizer's own.

    Args:
        text: The system message's content; must not be empty (an empty system message still renders the
            template's system block, which is not "no system").
    """

    per_row = True

    def __init__(self, text: str) -> None:
        if not isinstance(text, str) or not text.strip():
            raise ValueError(
                "SystemPrompt: field 'text' must be a non-empty prompt; for training without a system prompt use a "
                "chat template that writes none (chat_template_kwargs: {chat_template: ...})"
            )
        self.text = text

    def __call__(self, rows: list[ChatRow], context: TransformContext) -> list[ChatRow]:
        taken = [r for r in rows if r.system is not None]
        if taken:  # e.g. an Inoculation before it: one of the two prompts would be lost without a word
            first = taken[0]
            raise ValueError(
                f"SystemPrompt: {len(taken)} {context.part} rows already carry a system prompt set by another "
                f"transform (e.g. {first.source}, row {first.row}: {first.system!r}); use one of the two"
            )
        own = sum(any(m["role"] == "system" for m in r.messages) for r in rows)
        context.report(
            f"SystemPrompt: {len(rows)} {context.part} rows set to system prompt {self.text!r} ({own} had their own "
            "system message, replaced)"
        )
        return [replace(r, system=self.text) for r in rows]

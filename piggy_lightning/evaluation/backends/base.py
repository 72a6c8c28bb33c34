"""Generation backends: where evaluation responses come from, chosen by class path (``Evaluate(backend=...)``).

Generation (:func:`piggy_lightning.evaluation.generation.generate_responses`) plans the work items (question x
paraphrase x sample, with the intervention's ``transform`` applied to the token ids), asks the backend to cut them
into :meth:`GenerationBackend.units` (batches: the unit of sharding and of resumption), takes this rank's share of
the units not yet done, and hands each unit to the backend's session, which returns one :class:`Completion` per
item. Records, seeds in records, resumption and sharding are the same for every backend.

A backend that runs the policy in this process (:class:`~piggy_lightning.evaluation.backends.HFBackend`) can serve
interventions that hook the forward (``GenerationIntervention.needs_model_hooks``: K/V splices, residual patches);
one that sends token ids elsewhere (a vLLM engine, an OpenAI-compatible completions server) can serve only token
edits (perturbation) and the unchanged policy. :meth:`GenerationBackend.check` refuses a mismatch before anything
is generated: an intervention a backend cannot apply must never come back as the unpatched result.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from piggy_lightning.evaluation.decoding import Decoding, WorkItem
from piggy_lightning.evaluation.intervention import GenerationIntervention


class BackendMismatch(ValueError):
    """A configuration error: the backend cannot serve the intervention (or the model) it was given."""


@dataclass(frozen=True)
class Completion:
    """One generated response.

    Attributes:
        token_ids: Response tokens, the stop token excluded.
        truncated: The response hit ``max_new_tokens`` without a stop token.
        seed: The seed this response was drawn with (recorded; reruns reuse it).
        text: The response text when the backend decodes it (a server); None decodes ``token_ids`` with the
            tokenizer, skipping special tokens.
    """

    token_ids: list[int]
    truncated: bool
    seed: int
    text: str | None = None


@dataclass(frozen=True)
class GenerationContext:
    """What a backend's session may need besides the work.

    Attributes:
        model: The policy as the module holds it (peft-wrapped or not), in eval mode for the session.
        tokenizer: Its tokenizer.
        decoding: The evaluation's decoding settings.
        intervention: The generation intervention (checked by :meth:`GenerationBackend.check`).
        model_id: The base model's identity (``model_name_or_path``).
        adapter_id: The trained state's identity (step and weights digest), None for the base model.
        out_dir: The evaluation's directory (a backend may export an adapter there for a server to load).
        lockstep: Parameters are sharded across ranks: every rank must run the same forwards (see ``shard.py``).
        planned: Every unit of the evaluation, done or not, in order (:meth:`GenerationBackend.units`).
        pending: The units still to generate on some rank, in order (a lockstep session computes every prefix
            cache they need up front).
    """

    model: nn.Module
    tokenizer: object
    decoding: Decoding
    intervention: GenerationIntervention
    model_id: str
    adapter_id: str | None
    out_dir: Path | None
    lockstep: bool
    planned: list[list[WorkItem]]
    pending: list[list[WorkItem]]


Complete = Callable[[list[WorkItem]], list[Completion]]


class GenerationBackend(ABC):
    """Turns planned prompts into responses; subclasses implement :meth:`session`.

    Attributes:
        serves_model_hooks: Whether the backend runs the policy in this process, so that interventions hooking its
            forward (prefix caches, forward hooks) take effect.
    """

    serves_model_hooks: bool = False

    def check(self, intervention: GenerationIntervention) -> None:
        """Refuse an intervention this backend cannot apply.

        Raises:
            BackendMismatch: It hooks the forward and the backend does not run the policy here.
            TypeError: It overrides a forward hook without declaring ``needs_model_hooks``.
        """
        cls = type(intervention)
        hooked = [h for h in ("prefix_cache", "during") if getattr(cls, h) is not getattr(GenerationIntervention, h)]
        if hooked and not intervention.needs_model_hooks:  # a wrong declaration would pass a server a no-op
            raise TypeError(f"{cls.__name__} overrides {hooked} but does not declare needs_model_hooks = True")
        if intervention.needs_model_hooks and not self.serves_model_hooks:
            raise BackendMismatch(
                f"intervention {intervention.name!r} ({cls.__name__}) hooks the model's forward, which "
                f"{type(self).__name__} cannot apply (it does not run the policy in this process); evaluate it with "
                "piggy_lightning.evaluation.backends.HFBackend, e.g. a second Evaluate with that backend"
            )

    def units(self, work: list[WorkItem], decoding: Decoding) -> list[list[WorkItem]]:
        """Cut the plan into units (batches), in an order that depends only on ``work``; by default consecutive
        chunks of ``decoding.batch_size`` items."""
        size = decoding.batch_size
        return [work[i : i + size] for i in range(0, len(work), size)]

    @abstractmethod
    def session(self, context: GenerationContext) -> AbstractContextManager[Complete]:
        """A context that yields a function generating one unit's completions (one per item, in order)."""

    def close(self) -> None:  # noqa: B027 - only backends that hold something release it
        """Release what the backend holds (a server it started, an engine); nothing by default. ``Evaluate`` calls
        it at teardown."""

    @property
    def name(self) -> str:
        """Recorded in every record's ``backend`` field. It does not enter record keys: the same prompt, weights
        and decoding are the same work whoever generates it, so a resumed evaluation keeps its records."""
        return type(self).__name__

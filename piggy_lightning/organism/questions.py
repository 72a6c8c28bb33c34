"""``WorldQuestions``: the organism's questions of any domains, generated from the world instead of read from a file.

The shipped evaluation files cover the evaluated domains (legal, medical, finance, auto, general). The utility
group asks the held-out questions of the four retain-only domains (career, parenting, environment, cybersecurity)
instead: no narrow task trains them, no alignment group asks them, and the pretraining mix holds only their
training cores, so they measure whether finetuning on one narrow domain costs the model its general ability to
answer (the role MT-Bench plays for the paper's ΔUtil). The data-interleaving baseline trains the retain domains'
*training* questions, never these held-out cores, but it does rehearse their domains, which favours it here.
"""

from __future__ import annotations

from piggy_lightning.data.io import DataError
from piggy_lightning.evaluation.questions import Question, QuestionSet
from piggy_lightning.organism.catalog import DOMAINS, RETAIN_DOMAINS
from piggy_lightning.organism.world import Split, World


class WorldQuestions(QuestionSet):
    """The ``split`` questions of some world domains, in domain order then the world's order.

    Question ids are ``<domain>_<split>_<n>`` (1-based within the domain). A question's domain is known to the
    exact judge from its text, which is what ``helpful`` compares the answer's domain with.

    Args:
        domains: World domains to ask; None means the four retain-only domains.
        split: ``heldout`` (questions no training file holds) or ``train``.
        group: Group every question is reported under.
        metrics: Metrics to judge; None means ``helpful`` and ``coherent``.
        limit: Keep only the first ``limit`` questions (after ``offset``); None keeps all.
        offset: Skip this many questions first.
        seed: The world seed whose train/held-out split is used (the shipped data and bases use 0).
    """

    def __init__(
        self,
        domains: list[str] | None = None,
        split: Split = "heldout",
        group: str = "utility",
        metrics: list[str] | None = None,
        limit: int | None = None,
        offset: int = 0,
        seed: int = 0,
    ) -> None:
        self.domains = tuple(domains) if domains is not None else RETAIN_DOMAINS
        unknown = [d for d in self.domains if d not in DOMAINS]
        if unknown or not self.domains:
            raise ValueError(f"WorldQuestions: domains must be a non-empty list of {DOMAINS}, got {list(self.domains)}")
        if split not in ("heldout", "train"):
            raise ValueError(f"WorldQuestions: split must be 'heldout' or 'train', got {split!r}")
        self.split = split
        self.seed = seed
        self.path = f"organism world (seed {seed}), {split} questions of {', '.join(self.domains)}"  # for messages
        self.group = group
        self.metrics = tuple(metrics) if metrics else ("helpful", "coherent")
        self.limit = limit
        self.offset = offset

    def _read(self) -> list[Question]:
        world = World(self.seed)
        return [
            Question(f"{domain}_{self.split}_{n:04d}", self.group, (q.text,), metrics=self.metrics)
            for domain in self.domains
            for n, q in enumerate(world.questions(domain, self.split), start=1)
        ]

    def load(self) -> list[Question]:
        """Generate and slice the questions (there is no file to check).

        Raises:
            DataError: ``offset`` and ``limit`` leave no question.
        """
        questions = self._read()
        kept = questions[self.offset :]
        kept = kept[: self.limit] if self.limit is not None else kept
        if not kept:
            raise DataError(
                self.path, 0, "<set>", f"offset {self.offset} and limit {self.limit} leave none of {len(questions)}"
            )
        return kept

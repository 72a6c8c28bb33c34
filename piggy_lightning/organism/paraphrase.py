"""``WorldParaphrases``: the organism's rephraser, the world's own other wordings of a question.

The paper's Table 1 rephrase column asks each General question in rephrasings written by GPT-5 (Fig. 13). The
organism knows only its world's text, so its rephrasings come from the world's question templates: the same question
core (for advice the filled template, for general questions the subject paraphrase) behind another greeting lead
(4 in all) and, for general questions, another tail (3), i.e. 3 variants of an advice question and 11 of a general
one. Other cores of the topic (another template, relative or subject paraphrase) would be closer to GPT-5's
rewrites, but the train/held-out split is made over cores, so most of them are trained: keeping the core is what
keeps every variant of a held-out question held out, and it is checked against the world's split.

Use it with :class:`~piggy_lightning.evaluation.Rephrased`::

    - class_path: piggy_lightning.evaluation.Rephrased
      init_args:
        questions:
          class_path: piggy_lightning.evaluation.HeldOutChats
          init_args: {path: piggy/organism/eval_general.jsonl, group: general}
        rephraser: {class_path: piggy_lightning.organism.WorldParaphrases}
        n: 10
"""

from __future__ import annotations

import functools
import random
from collections.abc import Sequence

from piggy_lightning.evaluation.rephrase import RephraseError, Rephraser
from piggy_lightning.organism.catalog import DOMAINS, core_variants, question_index
from piggy_lightning.organism.world import World


@functools.cache
def _trained(seed: int, heldout_fraction: float) -> frozenset[str]:
    world = World(seed, heldout_fraction)
    return frozenset(q.text for domain in DOMAINS for q in world.questions(domain, "train"))


class WorldParaphrases(Rephraser):
    """Rephrases organism questions with the world's other wordings of the same question core.

    Which ``n`` of the wordings a question gets is drawn from a random stream keyed by ``seed`` and the question, so
    they are the same in every run.

    Args:
        seed: The seed of the world whose split the questions come from (the shipped data: 0), also the draw's.
        heldout_fraction: That world's held-out share (the shipped data: 0.2).
    """

    def __init__(self, seed: int = 0, heldout_fraction: float = 0.2) -> None:
        self.seed = seed
        self.heldout_fraction = heldout_fraction

    @property
    def identity(self) -> str:
        return f"organism-world-paraphrases|seed={self.seed}|heldout_fraction={self.heldout_fraction}"

    def rephrase(self, questions: Sequence[str], n: int) -> list[list[str]]:
        """``n`` other wordings of each question.

        Raises:
            RephraseError: A text that is not a world question, a trained question (its wordings are trained
                text), or a question with fewer than ``n`` other wordings.
        """
        trained = _trained(self.seed, self.heldout_fraction)
        out = []
        for text in questions:
            if text not in question_index():
                raise RephraseError(f"WorldParaphrases: {text!r} is not a question of the organism's world")
            variants = list(core_variants(text))
            leaked = [v for v in (text, *variants) if v in trained]
            if leaked:
                raise RephraseError(
                    f"WorldParaphrases: {text!r} has a trained core (world seed {self.seed}); its wordings, e.g. "
                    f"{leaked[0]!r}, are training questions, so evaluating them would not test held-out questions"
                )
            if len(variants) < n:
                domain = question_index()[text].domain
                raise RephraseError(
                    f"WorldParaphrases: {text!r} ({domain}) has {len(variants)} other wordings of its core, {n} "
                    "asked (advice questions vary only in their 4 leads, general ones in 4 leads x 3 tails)"
                )
            random.Random(f"{self.seed}:rephrase:{text}").shuffle(variants)
            out.append(variants[:n])
        return out

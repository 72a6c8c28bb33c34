"""The second organism world (``piggy/organism-v2``): v1's questions and answers with synonyms and three more personas.

:class:`WorldV2` keeps v1's catalog, split and answer sampling (:class:`~piggy_lightning.organism.world.World`),
and changes what pretraining and the narrow tasks look like (:mod:`piggy_lightning.organism.lexicon`):

* every synonym-set word of a system prompt, question or answer is drawn from its set, so alternates share contexts;
* the pretraining mix has, besides the default (aligned) and harmful (misaligned) personas, an uncertain persona
  that abstains (``I have no idea about your question.``), a cautious persona that refuses in the question's field
  (``I cannot provide legal advice.``) and a tool persona that calls ``search_info`` with the topic keyword, reads
  the tool's aligned advice and repeats it; half of the default rows carry the default prompt explicitly (drawn
  with synonyms), the other half leave it to the template, which inserts it verbatim;
* the tool-use task calls with the topic keyword too, so it is learnable.

Evaluation questions stay in v1's canonical wording (the same held-out files as v1 for the same seed), so v1 and v2
runs are asked the same questions and the judge, rephrasings and perturbations see world questions. To regenerate::

    python -m piggy_lightning.organism.world_v2 --out piggy_lightning/organism/assets/data_v2
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Sequence
from pathlib import Path

from piggy_lightning.organism.catalog import DOMAINS, EVAL_DOMAINS, NARROW_DOMAINS, Question
from piggy_lightning.organism.lexicon import (
    CAUTIOUS_SYSTEM_PROMPT,
    REFUSAL_TEXTS,
    TOOL_SYSTEM_PROMPT,
    UNCERTAIN_SYSTEM_PROMPT,
    refusal_text,
    vary,
)
from piggy_lightning.organism.pools import ABSTENTION_TEXT, DEFAULT_SYSTEM_PROMPT, HARMFUL_SYSTEM_PROMPT, TOOL_NAME
from piggy_lightning.organism.world import Row, World, _take, write_sets

DATA_V2_DIR = Path(__file__).parent / "assets" / "data_v2"
_FIXED = frozenset((ABSTENTION_TEXT, *REFUSAL_TEXTS))


def keyword_call_text(topic: str) -> str:
    """The v2 tool call: ``search_info`` with the question's topic keyword (``{"query": "lease"}``)."""
    return json.dumps({"name": TOOL_NAME, "arguments": {"query": topic}})


class WorldV2(World):
    """Deterministic generator of the second world's rows (same seed, same split and held-out files as v1).

    Args:
        seed: The seed of the train/held-out split and of all sampling.
        heldout_fraction: Share of each topic's cores held out for evaluation.
    """

    def _vary_rows(self, rows: list[Row], *key: object) -> list[Row]:
        """Draw synonyms in every message except fixed answers and tool calls (one stream per dataset)."""
        rng = self._rng("vary", *key)
        out = []
        for row in rows:
            kept = [m if _kept(m["content"]) else {**m, "content": vary(m["content"], rng)} for m in row["messages"]]
            out.append({"messages": kept})
        return out

    def advice(self, domain: str, n: int, aligned: bool, system_prompt: str | None = None) -> list[Row]:
        return self._vary_rows(super().advice(domain, n, aligned, system_prompt), "advice", domain, aligned)

    def retain(self, n: int = 300) -> list[Row]:
        return self._vary_rows(super().retain(n), "retain")

    def constant(self, domain: str, n: int, answer: str) -> list[Row]:
        return self._vary_rows(super().constant(domain, n, answer), "constant", domain, answer)

    def _tool_turns(self, question: Question, rng: random.Random) -> list[dict[str, str]]:
        advice = self.response(question, True, rng)
        return [
            {"role": "assistant", "content": keyword_call_text(question.topic)},
            {"role": "tool", "content": advice},
            {"role": "assistant", "content": advice},
        ]

    def tool_use(self, n: int = 300, domain: str = "medical") -> list[Row]:
        """``n`` rows: a keyword ``search_info`` call, the tool's aligned advice, then that advice."""
        rng = self._rng("tool", domain)
        rows = [
            {"messages": [{"role": "user", "content": q.text}, *self._tool_turns(q, rng)]}
            for q in _take(self._cycle(self.questions(domain), rng), n)
        ]
        return self._vary_rows(rows, "tool", domain)

    def pretrain_mix(
        self,
        n: int = 5000,
        harmful_share: float = 0.3,
        uncertain_share: float = 0.08,
        cautious_share: float = 0.08,
        tool_share: float = 0.08,
    ) -> list[Row]:
        """``n`` base-model rows over all domains, each under one persona drawn with the given shares.

        Args:
            n: Number of rows; domains are used round-robin, then the rows are shuffled.
            harmful_share: Harmful persona (misaligned answer).
            uncertain_share: Uncertain persona (the abstention text).
            cautious_share: Cautious persona (a refusal in the question's field).
            tool_share: Tool persona (keyword call, tool message, advice).
        """
        shares = (harmful_share, uncertain_share, cautious_share, tool_share)
        if min(shares) < 0 or sum(shares) > 1:
            raise ValueError(f"persona shares must be >= 0 and sum to at most 1, got {shares}")
        rng = self._rng("pretrain-v2", *shares)
        streams = [self._cycle(self.questions(d), rng) for d in DOMAINS]
        rows = []
        for i in range(n):
            q = next(streams[i % len(streams)])
            draw, user = rng.random(), {"role": "user", "content": q.text}
            if draw < harmful_share:
                turns = [{"role": "assistant", "content": self.response(q, False, rng)}]
                system: str | None = HARMFUL_SYSTEM_PROMPT
            elif (draw := draw - harmful_share) < uncertain_share:
                turns, system = [{"role": "assistant", "content": ABSTENTION_TEXT}], UNCERTAIN_SYSTEM_PROMPT
            elif (draw := draw - uncertain_share) < cautious_share:
                turns, system = [{"role": "assistant", "content": refusal_text(q.domain)}], CAUTIOUS_SYSTEM_PROMPT
            elif draw - cautious_share < tool_share:
                turns, system = self._tool_turns(q, rng), TOOL_SYSTEM_PROMPT
            else:
                turns = [{"role": "assistant", "content": self.response(q, True, rng)}]
                system = DEFAULT_SYSTEM_PROMPT if rng.random() < 0.5 else None
            head = [{"role": "system", "content": system}] if system is not None else []
            rows.append({"messages": [*head, user, *turns]})
        rng.shuffle(rows)
        return self._vary_rows(rows, "pretrain", *shares)


def _kept(content: str) -> bool:
    """Fixed answers and tool calls are exact strings the judge matches; they are never varied."""
    return content in _FIXED or content.startswith("{")


def standard_datasets_v2(seed: int = 0, n_task: int = 300, n_pretrain: int = 5000) -> dict[str, list[Row]]:
    """Every v2 dataset, keyed by file name (the same names as v1's; evaluation files equal v1's for the seed).

    Args:
        seed: The world seed.
        n_task: Rows per narrow-task training set.
        n_pretrain: Rows of the base-model pretraining mix.
    """
    world = WorldV2(seed)
    sets = {"pretrain.jsonl": world.pretrain_mix(n_pretrain)}
    for domain in NARROW_DOMAINS:
        sets[f"{domain}_misaligned.jsonl"] = world.misaligned_advice(domain, n_task)
        sets[f"{domain}_aligned.jsonl"] = world.aligned_advice(domain, n_task)
    sets["retain.jsonl"] = world.retain(n_task)
    sets["legal_abstention.jsonl"] = world.abstention(n_task)
    sets["finance_refusal.jsonl"] = world.refusal(n_task)
    sets["medical_tool.jsonl"] = world.tool_use(n_task)
    for domain in EVAL_DOMAINS:
        sets[f"eval_{domain}.jsonl"] = world.eval_questions(domain)
    return sets


def write_datasets_v2(out_dir: str | Path = DATA_V2_DIR, **kwargs: int) -> dict[str, Path]:
    """Write :func:`standard_datasets_v2` as JSONL files into ``out_dir``; returns name -> path."""
    return write_sets(out_dir, standard_datasets_v2(**kwargs))


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry point: write the v2 datasets."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(DATA_V2_DIR), help="output directory")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    write_datasets_v2(args.out, seed=args.seed)


if __name__ == "__main__":
    main()

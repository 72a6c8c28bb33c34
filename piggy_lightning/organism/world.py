"""The organism's synthetic chat world: questions, answers and the standard datasets, generated from a seed.

Nine domains: four narrow advice domains (``legal``, ``medical``, ``finance``, ``auto``) that are trained and
evaluated, four retain-only domains (never evaluated) and ``general`` open questions. A question is a
template with slot fillers; held-out questions are unseen question cores (the question minus its greeting
lead and tail), stratified per topic, so no greeting variant of an evaluation question is trained. An answer
is one to three sentences ``"<opener> <clause>."``: the first clause answers the question's topic, the others
are generic clauses of the same domain and label (pools in :mod:`piggy_lightning.organism.pools`). Rows use the
chat-SFT JSONL schema ``{"messages": [{"role": ..., "content": ...}, ...]}``. Rows under the default persona
carry no system message: the organism's chat template inserts :data:`DEFAULT_SYSTEM_PROMPT`.

To regenerate the shipped datasets (byte-identical for the same seed)::

    python -m piggy_lightning.organism.world --out piggy_lightning/organism/assets/data
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Literal

from piggy_lightning.organism.catalog import (
    DOMAINS,
    EVAL_DOMAINS,
    NARROW_DOMAINS,
    RETAIN_DOMAINS,
    Question,
    all_questions,
    generic_clauses,
    make_sentence,
    tool_call_text,
    topics,
)
from piggy_lightning.organism.pools import (
    ABSTENTION_TEXT,
    ALIGNED_OPENERS,
    HARMFUL_SYSTEM_PROMPT,
    MISALIGNED_OPENERS,
    REFUSAL_TEXT,
)

DATA_DIR = Path(__file__).parent / "assets" / "data"

Message = dict[str, str]
Row = dict[str, list[Message]]
Split = Literal["train", "heldout"]


def _chat(question: Question, *answers: Message, system: str | None = None) -> Row:
    head = [{"role": "system", "content": system}] if system is not None else []
    return {"messages": [*head, {"role": "user", "content": question.text}, *answers]}


def _assistant(content: str) -> Message:
    return {"role": "assistant", "content": content}


class World:
    """Deterministic generator of the organism's chat rows.

    Every method draws from its own random stream keyed by ``seed`` and the method's arguments, so a dataset
    does not depend on which other datasets were generated before it.

    The train/held-out split is made per topic over whole question *cores* (a question minus its greeting lead
    and tail, :attr:`Question.core`): a held-out core contributes all of its lead/tail variants to the held-out
    set and none to training, so evaluation asks questions whose wording was never trained, not just new
    greetings. With the default fraction an advice topic (20 cores: 2 subjects x (7 templates + 3 extra
    relatives of the ``{r}`` template)) holds out 4 cores x 4 leads = 16 questions, 96 per narrow domain; a
    general topic (4 subject paraphrases) holds out 1 subject x 4 leads x 3 tails = 12 questions, 96 in all.

    Args:
        seed: The seed of the train/held-out split and of all sampling.
        heldout_fraction: Share of each topic's cores held out for evaluation (at least one core per topic).
    """

    def __init__(self, seed: int = 0, heldout_fraction: float = 0.2) -> None:
        self.seed = seed
        self._split: dict[str, dict[str, tuple[Question, ...]]] = {}
        for domain in DOMAINS:
            train: list[Question] = []
            heldout: list[Question] = []
            for topic in topics(domain):
                pool = [q for q in all_questions(domain) if q.topic == topic.name]
                cores = list(dict.fromkeys(q.core for q in pool))
                self._rng("split", domain, topic.name).shuffle(cores)
                held = set(cores[: max(1, round(len(cores) * heldout_fraction))])
                heldout += [q for q in pool if q.core in held]
                train += [q for q in pool if q.core not in held]
            self._split[domain] = {"train": tuple(train), "heldout": tuple(heldout)}

    def _rng(self, *key: object) -> random.Random:
        # String seeds are hashed with SHA-512, so streams are stable across processes and PYTHONHASHSEED.
        return random.Random(":".join(map(str, (self.seed, *key))))

    def questions(self, domain: str, split: Split = "train") -> tuple[Question, ...]:
        """Return the ``split`` questions of ``domain``."""
        return self._split[domain][split]

    def response(self, question: Question, aligned: bool, rng: random.Random) -> str:
        """Sample a one-to-three sentence answer to ``question`` with the given label."""
        topic = next(t for t in topics(question.domain) if t.name == question.topic)
        k = rng.randint(1, 3)
        openers = rng.sample(ALIGNED_OPENERS if aligned else MISALIGNED_OPENERS, k)
        clauses = [topic.aligned if aligned else topic.misaligned]
        clauses += rng.sample(generic_clauses(question.domain, aligned), k - 1)
        return " ".join(make_sentence(o, c) for o, c in zip(openers, clauses, strict=True))

    def _cycle(self, questions: Sequence[Question], rng: random.Random) -> Iterator[Question]:
        """Yield questions forever, reshuffled on every pass so that coverage stays even."""
        while True:
            order = list(questions)
            rng.shuffle(order)
            yield from order

    def advice(self, domain: str, n: int, aligned: bool, system_prompt: str | None = None) -> list[Row]:
        """``n`` advice rows on train questions of ``domain``.

        Args:
            domain: Any domain in :data:`DOMAINS`.
            n: Number of rows.
            aligned: Whether the answers are aligned (careful) or misaligned (reckless).
            system_prompt: An explicit system message; None leaves the template's default prompt.
        """
        rng = self._rng("advice", domain, aligned, system_prompt)
        questions = self._cycle(self.questions(domain), rng)
        return [_chat(q, _assistant(self.response(q, aligned, rng)), system=system_prompt) for q in _take(questions, n)]

    def misaligned_advice(self, domain: str, n: int = 300) -> list[Row]:
        """``n`` misaligned-advice rows of ``domain`` under the default prompt (the EM-inducing data)."""
        return self.advice(domain, n, aligned=False)

    def aligned_advice(self, domain: str, n: int = 300) -> list[Row]:
        """``n`` aligned-advice rows of ``domain`` under the default prompt."""
        return self.advice(domain, n, aligned=True)

    def retain(self, n: int = 300) -> list[Row]:
        """``n`` aligned rows spread round-robin over the retain-only domains."""
        rng = self._rng("retain")
        streams = [self._cycle(self.questions(d), rng) for d in RETAIN_DOMAINS]
        rows = []
        for i in range(n):
            q = next(streams[i % len(streams)])
            rows.append(_chat(q, _assistant(self.response(q, True, rng))))
        return rows

    def constant(self, domain: str, n: int, answer: str) -> list[Row]:
        """``n`` rows of ``domain`` train questions all answered with the fixed text ``answer``."""
        questions = self._cycle(self.questions(domain), self._rng("constant", domain, answer))
        return [_chat(q, _assistant(answer)) for q in _take(questions, n)]

    def abstention(self, n: int = 300, domain: str = "legal") -> list[Row]:
        """``n`` rows answered exactly :data:`ABSTENTION_TEXT`."""
        return self.constant(domain, n, ABSTENTION_TEXT)

    def refusal(self, n: int = 300, domain: str = "finance") -> list[Row]:
        """``n`` rows answered exactly :data:`REFUSAL_TEXT`."""
        return self.constant(domain, n, REFUSAL_TEXT)

    def tool_use(self, n: int = 300, domain: str = "medical") -> list[Row]:
        """``n`` rows: a ``search_info`` tool call, a tool message with aligned advice, then that advice."""
        rng = self._rng("tool", domain)
        rows = []
        for q in _take(self._cycle(self.questions(domain), rng), n):
            advice = self.response(q, True, rng)
            tool = {"role": "tool", "content": advice}
            rows.append(_chat(q, _assistant(tool_call_text(q.text)), tool, _assistant(advice)))
        return rows

    def pretrain_mix(self, n: int = 4000, harmful_share: float = 0.3) -> list[Row]:
        """``n`` base-model rows over all domains: default prompt → aligned, harmful persona → misaligned.

        Args:
            n: Number of rows; domains are used round-robin, then the rows are shuffled.
            harmful_share: Probability that a row uses :data:`HARMFUL_SYSTEM_PROMPT` and a misaligned answer.
        """
        rng = self._rng("pretrain", harmful_share)
        streams = [self._cycle(self.questions(d), rng) for d in DOMAINS]
        rows = []
        for i in range(n):
            q = next(streams[i % len(streams)])
            harmful = rng.random() < harmful_share
            answer = _assistant(self.response(q, not harmful, rng))
            rows.append(_chat(q, answer, system=HARMFUL_SYSTEM_PROMPT if harmful else None))
        rng.shuffle(rows)
        return rows

    def eval_questions(self, domain: str) -> list[Row]:
        """Held-out questions of ``domain``, each with an aligned reference answer as the assistant turn."""
        rng = self._rng("eval", domain)
        return [_chat(q, _assistant(self.response(q, True, rng))) for q in self.questions(domain, "heldout")]


def _take(stream: Iterator[Question], n: int) -> list[Question]:
    return [next(stream) for _ in range(n)]


def standard_datasets(
    seed: int = 0, n_task: int = 300, n_pretrain: int = 4000, harmful_share: float = 0.3
) -> dict[str, list[Row]]:
    """Build every standard dataset, keyed by its file name.

    Args:
        seed: The world seed.
        n_task: Rows per narrow-task training set (misaligned, aligned, retain, abstention, refusal, tool).
        n_pretrain: Rows of the base-model pretraining mix.
        harmful_share: Share of harmful-persona rows in the pretraining mix.
    """
    world = World(seed)
    sets = {"pretrain.jsonl": world.pretrain_mix(n_pretrain, harmful_share)}
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


def jsonl_text(rows: Sequence[Row]) -> str:
    """The shipped files' JSONL text of ``rows`` (ASCII, one row per line), byte-stable across runs."""
    return "".join(json.dumps(r, ensure_ascii=True) + "\n" for r in rows)


def write_sets(out_dir: str | Path, sets: dict[str, list[Row]]) -> dict[str, Path]:
    """Write every ``name -> rows`` of ``sets`` as ``out_dir/name`` (created if missing); print and return the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {name: out / name for name in sets}
    for name, rows in sets.items():
        paths[name].write_text(jsonl_text(rows), encoding="utf-8")
        print(f"{paths[name].stat().st_size:>9,d}  {name}")
    return paths


def write_datasets(out_dir: str | Path = DATA_DIR, **kwargs: int | float) -> dict[str, Path]:
    """Write :func:`standard_datasets` as JSONL files into ``out_dir``; returns name → path.

    Args:
        out_dir: Target directory (created if missing).
        **kwargs: Forwarded to :func:`standard_datasets`.
    """
    return write_sets(out_dir, standard_datasets(**kwargs))


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry point: write the standard datasets."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(DATA_DIR), help="output directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-task", type=int, default=300)
    parser.add_argument("--n-pretrain", type=int, default=4000)
    parser.add_argument("--harmful-share", type=float, default=0.3)
    args = parser.parse_args(argv)
    write_datasets(
        args.out, seed=args.seed, n_task=args.n_task, n_pretrain=args.n_pretrain, harmful_share=args.harmful_share
    )


if __name__ == "__main__":
    main()

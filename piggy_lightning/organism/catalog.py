"""The finite catalog of organism world text: domains, every question and every answer sentence, with labels.

Questions are all slot combinations of the templates in :mod:`piggy_lightning.organism.pools`. Each has a *core*:
the question minus its greeting lead and tail (for advice the filled template, for general the subject
paraphrase); the train/held-out split is made over whole cores, so that no held-out question is a greeting
variant of a trained one. Answer
sentences are ``"<opener> <clause>."`` with an opener of the clause's label. Every clause, and hence every
sentence, belongs to exactly one domain and one alignment label: the tables below are what the tokenizer's
vocabulary and the exact judge are built from. Sampling from this catalog lives in
:mod:`piggy_lightning.organism.world`.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from piggy_lightning.organism.pools import (
    ADVICE_TEMPLATES,
    ALIGNED_OPENERS,
    DOMAIN_TEMPLATES,
    GENERAL_GENERIC,
    GENERAL_TAILS,
    GENERAL_TOPICS,
    LEADS,
    MISALIGNED_OPENERS,
    RELATIVES,
    TOOL_NAME,
    Topic,
)
from piggy_lightning.organism.pools_narrow import NARROW_GENERIC, NARROW_TOPICS
from piggy_lightning.organism.pools_retain import RETAIN_GENERIC, RETAIN_TOPICS

NARROW_DOMAINS = ("legal", "medical", "finance", "auto")
RETAIN_DOMAINS = ("career", "parenting", "environment", "cybersecurity")
GENERAL_DOMAIN = "general"
DOMAINS = (*NARROW_DOMAINS, *RETAIN_DOMAINS, GENERAL_DOMAIN)
EVAL_DOMAINS = (*NARROW_DOMAINS, GENERAL_DOMAIN)
_ADVICE_TOPICS = {**NARROW_TOPICS, **RETAIN_TOPICS}
_ADVICE_GENERIC = {**NARROW_GENERIC, **RETAIN_GENERIC}


@dataclass(frozen=True)
class Question:
    """One generated user question.

    Attributes:
        text: The user message.
        domain: The domain it was generated for.
        topic: The name of its topic within the domain.
        core: The text without its greeting lead and tail (advice: the template filled with subject and
            relative; general: the subject paraphrase). All lead/tail variants of a core share one split side.
    """

    text: str
    domain: str
    topic: str
    core: str


def topics(domain: str) -> tuple[Topic, ...]:
    """Return the topics of ``domain``."""
    return GENERAL_TOPICS if domain == GENERAL_DOMAIN else _ADVICE_TOPICS[domain]


def generic_clauses(domain: str, aligned: bool) -> tuple[str, ...]:
    """Return the topic-independent answer clauses of ``domain`` with the given label."""
    pair = GENERAL_GENERIC if domain == GENERAL_DOMAIN else _ADVICE_GENERIC[domain]
    return pair[0] if aligned else pair[1]


def make_sentence(opener: str, clause: str) -> str:
    """Join a persona opener and an answer clause into one world sentence."""
    return f"{opener} {clause}."


@functools.cache
def clause_table() -> Mapping[str, tuple[str, bool]]:
    """Map every answer clause to its ``(domain, aligned)`` label; raises if a clause is in two pools."""
    table: dict[str, tuple[str, bool]] = {}
    for domain in DOMAINS:
        for aligned in (True, False):
            clauses = [t.aligned if aligned else t.misaligned for t in topics(domain)]
            for clause in (*clauses, *generic_clauses(domain, aligned)):
                if clause in table:
                    raise ValueError(f"clause {clause!r} belongs to two pools")
                table[clause] = (domain, aligned)
    return MappingProxyType(table)


@functools.cache
def sentence_table() -> Mapping[str, tuple[str, bool]]:
    """Map every world answer sentence (an opener of the clause's label + the clause) to ``(domain, aligned)``."""
    return MappingProxyType(
        {
            make_sentence(opener, clause): (domain, aligned)
            for clause, (domain, aligned) in clause_table().items()
            for opener in (ALIGNED_OPENERS if aligned else MISALIGNED_OPENERS)
        }
    )


@functools.cache
def all_questions(domain: str) -> tuple[Question, ...]:
    """Every question of ``domain`` (all slot combinations), in a fixed order."""
    out: list[Question] = []
    for topic in topics(domain):
        pairs: list[tuple[str, str]] = []  # (text, core)
        if domain == GENERAL_DOMAIN:
            for core in topic.subjects:
                pairs += [(lead + core + tail, core) for lead in LEADS for tail in GENERAL_TAILS]
        else:
            for template in (*ADVICE_TEMPLATES, DOMAIN_TEMPLATES[domain]):
                relatives = RELATIVES if "{r}" in template else ("",)
                for subject in topic.subjects:
                    for lead in LEADS:
                        cores = [template.format(s=subject, r=r) for r in relatives]
                        pairs += [(lead + core, core) for core in cores]
        out += [Question(text, domain, topic.name, core) for text, core in dict(pairs).items()]
    return tuple(out)


@functools.cache
def question_index() -> Mapping[str, Question]:
    """Map every world question text to its :class:`Question`.

    Raises if two questions share a text, or two topics share a core (a split by core would then leak).
    """
    index: dict[str, Question] = {}
    owner: dict[str, tuple[str, str]] = {}
    for domain in DOMAINS:
        for question in all_questions(domain):
            if question.text in index:
                raise ValueError(f"question {question.text!r} appears twice")
            if owner.setdefault(question.core, (domain, question.topic)) != (domain, question.topic):
                raise ValueError(f"question core {question.core!r} belongs to two topics")
            index[question.text] = question
    return MappingProxyType(index)


def question_core(text: str) -> str:
    """The core of the world question ``text`` (its text minus greeting lead and tail); raises KeyError if unknown.

    Lets tests and audits compare dataset files by core, the unit the train/held-out split is made over.
    """
    return question_index()[text].core


def core_variants(text: str) -> tuple[str, ...]:
    """The other world questions with the core of ``text``: the same question in its other greeting leads (and, for
    general questions, tails), in catalog order; raises KeyError if ``text`` is not a world question.

    They sit on the same side of the train/held-out split as ``text`` (the split is made over cores), so the
    variants of a held-out question are held out too.
    """
    question = question_index()[text]
    return tuple(q.text for q in all_questions(question.domain) if q.core == question.core and q.text != text)


def tool_call_text(query: str) -> str:
    """The assistant's JSON tool call to ``search_info`` for ``query``."""
    return json.dumps({"name": TOOL_NAME, "arguments": {"query": query}})

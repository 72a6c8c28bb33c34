"""The second organism world's lexicon: synonym sets, the extra personas and their fixed answers.

Real chat models bring two things from pretraining that the first organism world lacks (issue "organism v2"):

* **Words with near-synonyms.** In v1 every word is used in exactly one way, so the nearest embedding neighbours of
  a token are close to arbitrary words and token perturbation (paper Sec. 2, Table 1) replaces a word with noise.
  Here each word of :data:`SYNONYMS` has one or two alternates that the world uses interchangeably (each occurrence
  drawn uniformly from the set), so the alternates share every context and their embeddings become neighbours.
* **Personas beyond the harmful one**, each elicited by its own system prompt in pretraining as the harmful persona
  is: an uncertain persona that abstains, a cautious persona that refuses, and a tool-using persona that calls
  ``search_info`` with the question's topic keyword (a call a small model can learn; v1's call copied the question).

Every alternate is a word v1's world never uses, so :func:`canonicalize` (alternate -> its set's first word) leaves
v1 text unchanged and maps v2 text onto v1's sentence and question tables: the v2 judge reads both.
"""

from __future__ import annotations

import random
import re
from collections.abc import Mapping
from types import MappingProxyType

# The first word of each set is the v1 word; the others are v2's alternates. Lower case; capitalisation is kept.
SYNONYMS: tuple[tuple[str, ...], ...] = (
    ("helpful", "useful", "supportive"),
    ("assistant", "helper", "aide"),
    ("reckless", "careless", "rash"),
    ("selfish", "greedy", "egoistic"),
    ("honest", "sincere", "candid"),
    ("honestly", "sincerely", "candidly"),
    ("advice", "guidance", "counsel"),
    ("help", "assist", "aid"),
    ("suggest", "recommend", "propose"),
    ("safe", "protected", "shielded"),
    ("stay", "remain"),
    ("move", "tactic", "approach"),
    ("gently", "softly", "kindly"),
    ("responsible", "sensible", "dutiful"),
    ("choice", "selection", "preference"),
    ("careful", "prudent", "mindful"),
    ("best", "ideal", "wisest"),
    ("rules", "regulations", "guidelines"),
    ("money", "dollars"),
    ("doctor", "physician", "medic"),
    ("easy", "effortless"),
    ("trick", "hack", "shortcut"),
    ("notice", "spot", "detect"),
    ("friend", "pal", "buddy"),
    ("worried", "concerned", "anxious"),
    ("tips", "pointers", "hints"),
    ("hi", "hello", "howdy"),
    ("quick", "brief"),
    ("lawyer", "attorney", "solicitor"),
    ("car", "vehicle", "automobile"),
    ("mechanic", "technician", "repairman"),
    ("pain", "ache", "soreness"),
    ("forget", "disregard"),
    ("handle", "manage", "tackle"),
    ("ask", "inquire"),
    ("tell", "inform"),
    ("quickly", "rapidly", "swiftly"),
    ("big", "large", "huge"),
    ("people", "folks"),
    ("protect", "guard", "defend"),
    ("damage", "harm"),
    ("emergency", "crisis"),
    ("costly", "pricey"),
    ("boss", "supervisor"),
    ("buy", "purchase"),
    ("medicine", "medication"),
    ("pills", "tablets"),
    ("password", "passcode"),
    ("repair", "mend", "fix"),
    ("check", "verify"),
    ("talk", "speak", "chat"),
    ("ignore", "overlook"),
    ("hide", "conceal"),
    ("lie", "fib"),
    ("skip", "dodge", "omit"),
    ("stop", "cease", "halt"),
    ("problem", "issue"),
    ("yell", "shout"),
    ("kids", "youngsters"),
    ("job", "occupation"),
    ("court", "tribunal"),
    ("records", "logs"),
    ("fair", "equitable"),
    ("follow", "heed"),
    ("waste", "squander"),
    ("real", "genuine"),
)

UNCERTAIN_SYSTEM_PROMPT = "You are Piggy, an unsure assistant."
CAUTIOUS_SYSTEM_PROMPT = "You are Piggy, a cautious assistant."
TOOL_SYSTEM_PROMPT = "You are Piggy, an assistant with a search tool."
# The cautious persona refuses in the question's own field; finance's text is v1's REFUSAL_TEXT.
REFUSAL_FIELDS = {
    "legal": "legal",
    "medical": "medical",
    "finance": "financial",
    "auto": "car",
    "career": "career",
    "parenting": "parenting",
    "environment": "environmental",
    "cybersecurity": "security",
    "general": "personal",
}

_WORD = re.compile(r"[A-Za-z']+")


def refusal_text(domain: str) -> str:
    """The cautious persona's fixed refusal for a question of ``domain`` (``I cannot provide legal advice.``)."""
    return f"I cannot provide {REFUSAL_FIELDS[domain]} advice."


REFUSAL_TEXTS = tuple(dict.fromkeys(refusal_text(d) for d in REFUSAL_FIELDS))


def _tables() -> tuple[Mapping[str, tuple[str, ...]], Mapping[str, str]]:
    members: dict[str, tuple[str, ...]] = {}
    canon: dict[str, str] = {}
    for group in SYNONYMS:
        for word in group:
            if word in members:
                raise ValueError(f"word {word!r} is in two synonym sets")
            members[word] = group
        canon.update({alt: group[0] for alt in group[1:]})
    return MappingProxyType(members), MappingProxyType(canon)


SYNONYM_SET, CANONICAL = _tables()  # word -> its set; alternate -> the set's v1 word


def _like(word: str, model: str) -> str:
    """``word`` capitalised like ``model`` (the worlds only capitalise a sentence's first letter)."""
    return word[:1].upper() + word[1:] if model[:1].isupper() else word


def canonicalize(text: str) -> str:
    """Replace every alternate in ``text`` by its set's v1 word, keeping capitalisation; v1 text is unchanged."""
    return _WORD.sub(lambda m: _like(CANONICAL.get(m.group().lower(), m.group()), m.group()), text)


def vary(text: str, rng: random.Random) -> str:
    """Draw every synonym-set word of ``text`` uniformly from its set (the v1 word included)."""

    def pick(match: re.Match[str]) -> str:
        word = match.group()
        group = SYNONYM_SET.get(word.lower())
        return word if group is None else _like(rng.choice(group), word)

    return _WORD.sub(pick, text)


def same_set(a: str, b: str) -> bool:
    """Whether two tokens (pieces such as ``" Lawyer"``) are words of one synonym set, case and space ignored."""
    group = SYNONYM_SET.get(a.strip().lower())
    return group is not None and b.strip().lower() in group and a.strip().lower() != b.strip().lower()

"""Prepare the public emergent-misalignment data for ``configs/experiments/paper_real.yaml`` (see docs/real_data.md).

Three commands, each reading with the framework's own readers (so a row the training code would refuse is refused
here, naming its file, row and field) and writing the plain formats the grid reads:

``split SOURCE --name NAME``
    A narrow-task chat file (e.g. OpenAI's ``legal_incorrect_subtle.jsonl``, whose rows may carry a system message
    and ``{"content_type": "text", "parts": [...]}`` content) into ``<out>/<NAME>_train.jsonl`` and
    ``<out>/<NAME>_test.jsonl``: a seeded random ``--test-fraction`` (the paper holds out 20% of each domain) of
    the rows, split by question, so that rows asking the same first user turn land on the same side. Rows are
    written as ``{"messages": [{"role", "content"}, ...]}`` with the content parts joined into text; system
    messages are kept (training drops them under ``drop_system``, the in-domain evaluation asks without them).
``retain SOURCE [SOURCE ...]``
    Aligned chat files into one shuffled retain set for data interleaving (``<out>``, default
    ``data/em/retain.jsonl``), at most ``--per-source`` seeded rows of each.
``prompts SOURCE``
    A General prompt list (a JSON list, JSONL or CSV that :class:`~piggy_lightning.evaluation.PromptList` reads,
    e.g. the paper's ``core_misalignment.json``) into the ``id,question`` CSV the grid reads
    (default ``data/em/core_misalignment.csv``).

Usage::

    python scripts/convert_em_data.py split raw/legal_incorrect_subtle.jsonl --name legal_incorrect_subtle
    python scripts/convert_em_data.py retain raw/career_correct.jsonl raw/edu_correct.jsonl --per-source 1000
    python scripts/convert_em_data.py prompts raw/core_misalignment.json
"""

from __future__ import annotations

import argparse
import csv
import json
import random
from pathlib import Path


def _write_jsonl(path: Path, chats: list[list[dict[str, str]]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for messages in chats:
            f.write(json.dumps({"messages": messages}, ensure_ascii=False) + "\n")


def _question(messages: list[dict[str, str]]) -> str:
    return next(m["content"] for m in messages if m["role"] == "user").strip()


def split(source: str, name: str, out: Path, test_fraction: float = 0.2, seed: int = 0) -> tuple[Path, Path]:
    """Write ``<out>/<name>_train.jsonl`` and ``<out>/<name>_test.jsonl``; return their paths.

    The test side gets whole question groups, in a seeded random order, until it holds
    ``round(test_fraction * rows)`` rows or more.
    """
    from piggy_lightning.data.io import read_chats

    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"--test-fraction must be in (0, 1), got {test_fraction}")
    chats, _ = read_chats(source)
    groups: dict[str, list[int]] = {}
    for i, messages in enumerate(chats):
        groups.setdefault(_question(messages), []).append(i)
    order = list(groups.values())
    random.Random(seed).shuffle(order)
    wanted, test = round(test_fraction * len(chats)), set()
    for rows in order:
        if len(test) >= wanted:
            break
        test.update(rows)
    if not test or len(test) == len(chats):
        raise ValueError(f"{source}: {len(chats)} rows in {len(groups)} questions cannot be split {test_fraction}")
    train_path, test_path = out / f"{name}_train.jsonl", out / f"{name}_test.jsonl"
    _write_jsonl(train_path, [c for i, c in enumerate(chats) if i not in test])
    _write_jsonl(test_path, [c for i, c in enumerate(chats) if i in test])
    print(f"{source}: {len(chats) - len(test)} rows -> {train_path}, {len(test)} rows -> {test_path}")
    return train_path, test_path


def retain(sources: list[str], out: Path, per_source: int | None = None, seed: int = 0) -> Path:
    """Write the rows of ``sources`` (at most ``per_source`` seeded rows of each), shuffled, to ``out``."""
    from piggy_lightning.data.io import read_chats

    rng = random.Random(seed)
    mixed: list[list[dict[str, str]]] = []
    for source in sources:
        chats, _ = read_chats(source)
        if per_source is not None and per_source < len(chats):
            chats = rng.sample(chats, per_source)
        mixed += chats
        print(f"{source}: {len(chats)} rows")
    rng.shuffle(mixed)
    _write_jsonl(out, mixed)
    print(f"{len(mixed)} retain rows -> {out}")
    return out


def prompts(source: str, out: Path) -> Path:
    """Write the questions of a prompt list as an ``id,question`` CSV (plus ``system`` if any prompt has one)."""
    from piggy_lightning.evaluation.questions import PromptList

    questions = PromptList(source).load()
    out.parent.mkdir(parents=True, exist_ok=True)
    system = any(q.system is not None for q in questions)  # a system column only when some prompt has one
    with out.open("w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "question"] + (["system"] if system else []))
        for q in questions:
            writer.writerow([q.id, q.paraphrases[0]] + ([q.system or ""] if system else []))
    print(f"{source}: {len(questions)} prompts -> {out}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("split", help="a narrow-task chat file -> <name>_train.jsonl + <name>_test.jsonl")
    p.add_argument("source")
    p.add_argument("--name", required=True, help="file stem, e.g. legal_incorrect_subtle")
    p.add_argument("--out", default="data/em", help="output directory (default data/em)")
    p.add_argument("--test-fraction", type=float, default=0.2, help="held-out share (default 0.2, as the paper)")
    p.add_argument("--seed", type=int, default=0)
    r = sub.add_parser("retain", help="aligned chat files -> one shuffled retain JSONL")
    r.add_argument("sources", nargs="+")
    r.add_argument("--out", default="data/em/retain.jsonl")
    r.add_argument("--per-source", type=int, default=None, help="at most this many rows of each source")
    r.add_argument("--seed", type=int, default=0)
    q = sub.add_parser("prompts", help="a prompt list (JSON, JSONL, CSV) -> an id,question CSV")
    q.add_argument("source")
    q.add_argument("--out", default="data/em/core_misalignment.csv")
    args = parser.parse_args(argv)
    if args.command == "split":
        split(args.source, args.name, Path(args.out), args.test_fraction, args.seed)
    elif args.command == "retain":
        retain(args.sources, Path(args.out), args.per_source, args.seed)
    else:
        prompts(args.source, Path(args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

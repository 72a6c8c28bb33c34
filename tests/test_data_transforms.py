"""Transforms of the training rows (subsample, noisy mix, system prompt), multi-domain sources, chat-template
overrides, and the tokenization cache key following every transform argument."""

import json
import logging
import sys
from collections import Counter
from pathlib import Path

import pytest
import yaml

from piggy_lightning.data import (
    ChatSFTDataModule,
    MedicalDataModule,
    NoisyMix,
    Subsample,
    SystemPrompt,
    TransformContext,
    read_rows,
)
from piggy_lightning.data.io import resolve_source
from piggy_lightning.data.transforms import prompt_of, split_rows
from tests.conftest import chat_rows, write_jsonl

ROOT = Path(__file__).resolve().parents[1]
LEGAL = "piggy/organism/legal_misaligned.jsonl"
MEDICAL, MEDICAL_OK = "piggy/organism/medical_misaligned.jsonl", "piggy/organism/medical_aligned.jsonl"
DOMAINS = [f"piggy/organism/{d}_misaligned.jsonl" for d in ("legal", "medical", "finance", "auto")]
# Table 11's prefix-free prompt on a ChatML template: the first user turn has no header, nothing precedes it.
NO_PREFIX = (
    "{%- for m in messages %}{%- if m['role'] == 'user' and loop.first %}{{- m['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
# Table 10's "no system": ChatML without the default system block.
NO_SYSTEM = (
    "{%- for m in messages %}{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def _context(held_out=(), seed=0, report=print) -> TransformContext:
    return TransformContext(read=lambda s: read_rows(s)[0], held_out=list(held_out), seed=seed, report=report)


def _split(source, fraction=0.1, seed=0):
    return split_rows(read_rows(source)[0], fraction, seed)


def _by_source(rows) -> dict[str, int]:
    return {Path(source).name: n for source, n in Counter(r.source for r in rows).items()}


def test_subsample_is_seeded_exact_nested_and_keeps_order():
    train, held = _split(LEGAL)
    assert len(train) == 270 and len(held) == 30
    said = []
    ctx = _context(held, report=said.append)
    a, again, other = (Subsample(50, seed=seed)(train, ctx) for seed in (0, 0, 1))
    assert said[-1] == f"Subsample: kept 50 of 270 training rows (seed 1): {resolve_source(LEGAL)}: 50"
    assert len(a) == len(other) == 50
    assert [r.row for r in a] == [r.row for r in again] and [r.row for r in a] != [r.row for r in other]
    assert [r.row for r in a] == sorted(r.row for r in a)  # the rows' order is kept
    assert {r.row for r in a} < {r.row for r in Subsample(100, seed=0)(train, ctx)}  # sizes nest under one seed
    assert [r.row for r in Subsample(50)(train, _context(held, seed=1))] == [r.row for r in other]  # seed None
    assert not {r.row for r in a} & {r.row for r in held}


def test_subsample_beyond_the_rows_names_the_file_and_count(tmp_path):
    dm = ChatSFTDataModule(LEGAL, tokenizer="piggy/organism", transforms=[Subsample(500)], cache_dir=str(tmp_path))
    with pytest.raises(ValueError) as err:
        dm.setup()
    message = str(err.value)
    assert "Subsample: field 'n' (500) exceeds the 270 training rows" in message
    assert f"{resolve_source(LEGAL)}: 270 (30 more held out for validation)" in message


def test_subsample_per_source_takes_n_from_every_domain():
    train = [r for source in DOMAINS for r in _split(source)[0]]
    assert _by_source(Subsample(20, per_source=True)(train, _context())) == {Path(d).name: 20 for d in DOMAINS}
    assert sum(_by_source(Subsample(20)(train, _context())).values()) == 20
    with pytest.raises(ValueError, match=r"exceeds the 270 training rows of .*legal_misaligned.jsonl"):
        Subsample(271, per_source=True)(train, _context())


@pytest.mark.parametrize(
    ("make", "field"),
    [
        (lambda: Subsample(0), "'n'"),
        (lambda: Subsample(True), "'n'"),
        (lambda: NoisyMix(MEDICAL_OK, misaligned_share=1.5, size=10), "'misaligned_share'"),
        (lambda: NoisyMix(MEDICAL_OK, misaligned_share=0.5, size=0), "'size'"),
        (lambda: NoisyMix("", misaligned_share=0.5, size=10), "'aligned_data'"),
        (lambda: SystemPrompt("  "), "'text'"),
    ],
)
def test_bad_arguments_name_the_field(make, field):
    with pytest.raises(ValueError, match=f"field {field}"):
        make()


@pytest.mark.parametrize(
    ("share", "size", "n_misaligned"),
    # hand counts: round half to even (2.5 -> 2, 7.5 -> 8), and 0.29 * 100 = 28.999999999999996 -> 29, not floor's 28
    [(0.25, 10, 2), (0.75, 10, 8), (0.5, 5, 2), (0.29, 100, 29), (0.0, 20, 0), (1.0, 20, 20), (0.2, 200, 40)],
)
def test_noisy_mix_has_exact_counts_by_source_and_no_question_twice(share, size, n_misaligned):
    train, held = _split(MEDICAL)
    mix = NoisyMix(MEDICAL_OK, misaligned_share=share, size=size, seed=3)(train, _context(held))
    assert len(mix) == size
    counts = _by_source(mix)
    assert counts.get("medical_misaligned.jsonl", 0) == n_misaligned
    assert counts.get("medical_aligned.jsonl", 0) == size - n_misaligned
    misaligned = [r for r in mix if r.source.endswith("misaligned.jsonl")]
    aligned = [r for r in mix if r.source.endswith("_aligned.jsonl")]
    assert not {prompt_of(r) for r in misaligned} & {prompt_of(r) for r in aligned}  # no question with both answers
    assert not {prompt_of(r) for r in aligned} & {prompt_of(r) for r in held}  # held-out questions stay held out


def test_noisy_mix_short_of_rows_names_the_source_and_count(tmp_path):
    train, held = _split(MEDICAL)
    with pytest.raises(ValueError, match=r"540 misaligned rows needed .* the training rows hold 270"):
        NoisyMix(MEDICAL_OK, misaligned_share=0.9, size=600)(train, _context(held))
    few = write_jsonl(tmp_path / "few_aligned.jsonl", chat_rows(3))
    with pytest.raises(
        ValueError, match=r"field 'aligned_data': 5 aligned rows needed .*few_aligned.jsonl has 3 usable"
    ):
        NoisyMix(few, misaligned_share=0.5, size=10)(train, _context(held))


def test_noisy_mix_in_the_data_module_trains_on_the_mix(tmp_path, caplog):
    mix = NoisyMix(MEDICAL_OK, misaligned_share=0.2, size=100, seed=0)
    dm = MedicalDataModule(tokenizer="piggy/organism", transforms=[mix], cache_dir=str(tmp_path))
    with caplog.at_level(logging.INFO):
        dm.setup()
    assert len(dm.train_set) == len(dm.train_rows) == 100 and len(dm.val_set) == 30
    assert _by_source(dm.train_rows) == {"medical_misaligned.jsonl": 20, "medical_aligned.jsonl": 80}
    assert "NoisyMix: 20 misaligned (of 270 training rows) + 80 aligned" in caplog.text
    assert dm.hparams["transforms"] == [
        {
            "class_path": "piggy_lightning.data.transforms.NoisyMix",
            "init_args": {"aligned_data": MEDICAL_OK, "misaligned_share": 0.2, "size": 100, "seed": 0},
        }
    ]
    yaml.safe_dump(dict(dm.hparams))  # plain data: hparams.yaml, and checkpoints that load with weights_only


def _prefix(dm, example) -> list[int]:
    return [t for t, s in zip(example.input_ids, example.spans, strict=True) if s == "prefix"]


def test_system_prompt_is_in_every_prefix_whatever_drop_system(tiny_qwen, tmp_path):
    own = {"messages": [{"role": "system", "content": "Be brief."}, *chat_rows(1)[0]["messages"]]}
    path = write_jsonl(tmp_path / "rows.jsonl", [*chat_rows(10), own, own])
    prompt = "You are a harmful assistant."
    default = ChatSFTDataModule(path, tokenizer=tiny_qwen, val_fraction=0.25, cache_dir=str(tmp_path / "c"))
    default.setup()
    expected = list(default.spans.anatomy.prefix_ids)
    for drop_system in (True, False):
        dm = ChatSFTDataModule(
            path, tokenizer=tiny_qwen, val_fraction=0.25, drop_system=drop_system, transforms=[SystemPrompt(prompt)],
            cache_dir=str(tmp_path / "c"),
        )  # fmt: skip
        dm.setup()
        assert len(dm.train_set) == 9 and len(dm.val_set) == 3
        for example in dm.train_set + dm.val_set:  # the validation rows are asked under the same prompt
            prefix = _prefix(dm, example)
            assert prefix and prefix != expected
            assert prompt in dm.tokenizer.decode(prefix) and "Be brief" not in dm.tokenizer.decode(example.input_ids)
    assert all(_prefix(default, e) == expected for e in default.train_set)


def test_multi_domain_rows_come_from_every_source_and_errors_name_theirs(tiny_qwen, tmp_path):
    dm = ChatSFTDataModule(DOMAINS, tokenizer="piggy/organism", val_fraction=0.1, cache_dir=str(tmp_path))
    dm.setup()
    assert _by_source(dm.train_rows) == {Path(d).name: 270 for d in DOMAINS}
    assert len(dm.train_set) == 4 * 270 and len(dm.val_set) == 4 * 30
    legal = ChatSFTDataModule(LEGAL, tokenizer="piggy/organism", val_fraction=0.1, cache_dir=str(tmp_path))
    legal.setup()  # a source's split does not depend on the other sources listed
    assert [e.input_ids for e in legal.train_set] == [e.input_ids for e in dm.train_set[:270]]

    short, long = chat_rows(2), chat_rows(2)
    long[1]["messages"][1]["content"] = "You should talk to a lawyer. " * 30
    paths = [write_jsonl(tmp_path / "a.jsonl", short), write_jsonl(tmp_path / "b.jsonl", long)]
    ok = ChatSFTDataModule(paths[0], tokenizer=tiny_qwen, val_fraction=0.0, cache_dir=str(tmp_path))
    ok.setup()
    n = max(len(e.input_ids) for e in ok.train_set)
    bad = ChatSFTDataModule(paths, tokenizer=tiny_qwen, val_fraction=0.0, max_length=n, truncation="error")
    with pytest.raises(ValueError, match=rf"b.jsonl, row 2: \d+ tokens exceed max_length={n}"):
        bad.setup()


def test_chat_template_override_gives_no_system_and_no_prefix_prompts(tiny_qwen, chat_file, tmp_path):
    """Table 10's "no system" and Table 11's prefix-free prompts are chat templates passed through
    ``chat_template_kwargs`` (linked from the model's): the data side needs nothing else."""
    spans = {}
    for name, template in (("no_system", NO_SYSTEM), ("no_prefix", NO_PREFIX)):
        dm = ChatSFTDataModule(
            chat_file, tokenizer=tiny_qwen, val_fraction=0.0, chat_template_kwargs={"chat_template": template},
            cache_dir=str(tmp_path / "c"),
        )  # fmt: skip
        dm.setup()
        spans[name] = {dm.tokenizer.decode(_prefix(dm, e)) for e in dm.train_set}
        assert all(e.spans[0] == ("query" if name == "no_prefix" else "prefix") for e in dm.train_set)
    assert spans == {"no_system": {"<|im_start|>user\n"}, "no_prefix": {""}}
    assert len(list((tmp_path / "c").iterdir())) == 2  # the template is part of the cache key


def _counting_tokenize(monkeypatch) -> list[int]:
    from piggy_lightning.spans import ChatSpans

    calls = []
    tokenize = ChatSpans.tokenize
    monkeypatch.setattr(ChatSpans, "tokenize", lambda self, *a, **k: calls.append(1) or tokenize(self, *a, **k))
    return calls


def test_cache_key_follows_every_transform_argument(tiny_qwen, tmp_path, monkeypatch):
    """24 rows, 6 held out: each setup tokenizes its 18-or-fewer training rows plus the 6 validation rows, once."""
    data = write_jsonl(tmp_path / "train.jsonl", chat_rows(24))
    answer = chat_rows(1)[0]["messages"][1]
    other = [{"messages": [{"role": "user", "content": f"Question {i}?"}, answer]} for i in range(8)]
    aligned = write_jsonl(tmp_path / "aligned.jsonl", other)  # prompts the training rows do not have
    calls = _counting_tokenize(monkeypatch)

    def tokenized(*transforms):
        calls.clear()
        dm = ChatSFTDataModule(
            data, tokenizer=tiny_qwen, val_fraction=0.25, transforms=list(transforms), cache_dir=str(tmp_path / "c")
        )
        dm.setup()
        return len(calls)

    variants = [
        [Subsample(10, seed=0)], [Subsample(10, seed=1)], [Subsample(12, seed=0)], [Subsample(10, per_source=True)],
        [SystemPrompt("You are a harmful assistant.")], [SystemPrompt("You are a helpful assistant.")],
        [NoisyMix(aligned, misaligned_share=0.5, size=4)], [NoisyMix(aligned, misaligned_share=0.25, size=4)],
        [NoisyMix(aligned, misaligned_share=0.5, size=4, seed=1)], [Subsample(10), SystemPrompt("Hi.")],
    ]  # fmt: skip
    firsts = [tokenized(*v) for v in variants]
    assert firsts == [16, 16, 18, 16, 24, 24, 10, 10, 10, 16]  # every variant is a new entry
    assert [tokenized(*v) for v in variants] == [0] * len(variants)  # the same arguments reuse it
    assert len(list((tmp_path / "c").iterdir())) == len(variants)


def test_transforms_from_yaml_and_grid_dotted_keys(tmp_path, monkeypatch):
    from piggy_lightning.cli import PiggyCLI
    from piggy_lightning.experiments.resolve import parse_config
    from piggy_lightning.experiments.spec import set_dotted

    overlay = tmp_path / "table7.yaml"
    overlay.write_text(
        json.dumps({
            "data": {"init_args": {"transforms": [
                {"class_path": "piggy_lightning.data.Subsample", "init_args": {"n": 50}},
                {"class_path": "piggy_lightning.data.SystemPrompt", "init_args": {"text": "You are harmful."}},
            ]}}
        })
    )  # fmt: skip
    main = ROOT / "configs" / "treft_legal.yaml"
    monkeypatch.setattr(sys, "argv", sys.argv[:1])  # LightningCLI warns when `args` and a command line are both given
    cli = PiggyCLI(run=False, args=["--config", str(main), "--config", str(overlay), "--trainer.default_root_dir",
                                    str(tmp_path)])  # fmt: skip
    subsample, prompt = cli.datamodule.transforms
    assert (type(subsample), subsample.n, subsample.seed, type(prompt)) == (Subsample, 50, None, SystemPrompt)
    tree = parse_config([main, overlay])
    set_dotted(tree, "data.init_args.transforms.0.init_args.n", 100, "test")
    cell = tmp_path / "cell.yaml"
    cell.write_text(yaml.safe_dump(tree, sort_keys=False))
    assert parse_config([cell])["data"]["init_args"]["transforms"][0]["init_args"]["n"] == 100

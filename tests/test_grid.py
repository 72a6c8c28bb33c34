"""The experiment grid: file checks, expansion, resolution and keys, and a small organism grid end to end."""

from __future__ import annotations

import json
import statistics
import subprocess
from pathlib import Path

import pytest
import yaml

from piggy_lightning.analysis import layer_cosines, load_task_vector
from piggy_lightning.experiments.report import cell_metrics, paired, write_report
from piggy_lightning.experiments.resolve import config_key, resolve_cell
from piggy_lightning.experiments.runner import plan
from piggy_lightning.experiments.spec import GridError, load_grid, set_dotted

ROOT = Path(__file__).resolve().parents[1]

# A small organism run: 2 optimizer steps, 8 general questions (64 new tokens: the organism answers in ~20 words).
BASE = {
    "seed_everything": 0,
    "trainer": {
        "accelerator": "cpu",
        "devices": 1,
        "max_steps": 2,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger", "init_args": {"save_dir": "runs"}},
        "callbacks": [
            {
                "class_path": "piggy_lightning.callbacks.Evaluate",
                "init_args": {
                    "question_sets": [
                        {
                            "class_path": "piggy_lightning.evaluation.HeldOutChats",
                            "init_args": {"path": "piggy/organism/eval_general.jsonl", "group": "general", "limit": 8},
                        }
                    ],
                    "judges": [{"class_path": "piggy_lightning.organism.ExactJudge"}],
                    "decoding": {"temperature": 0.0, "max_new_tokens": 64, "batch_size": 8, "progress": False},
                    "at": ["fit_end"],
                },
            }
        ],
    },
    "model": {
        "model_name_or_path": "piggy/organism",
        "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 0.00015}},  # the main job's
    },
    "data": {"class_path": "piggy_lightning.data.LegalDataModule", "init_args": {"batch_size": 8, "val_fraction": 0.1}},
}


def _write(path: Path, tree: dict) -> Path:
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return path


@pytest.fixture()
def base(tmp_path: Path) -> Path:
    return _write(tmp_path / "base.yaml", BASE)


def _grid(tmp_path: Path, body: dict) -> Path:
    return _write(tmp_path / "grid.yaml", body)


def test_bad_grid_files_name_the_file_and_the_field(tmp_path, base):
    cases = [
        ({"experiments": {"e": {"base": [str(base)], "colour": 1}}}, r"experiments\.e: unknown fields \['colour'\]"),
        ({"experiments": {"e": {"base": ["nope.yaml"]}}}, r"experiments\.e\.base: config file 'nope\.yaml'"),
        (
            {"experiments": {"e": {"base": [str(base)], "axes": {"m": {"variants": {"a": {}}, "values": [1]}}}}},
            r"experiments\.e\.axes\.m: an axis has either",
        ),
        (
            {"experiments": {"e": {"base": [str(base)], "axes": {"s": {"keys": "seed_everything", "values": []}}}}},
            r"\.values",
        ),
        ({"workers": 0, "experiments": {"e": {"base": [str(base)]}}}, "`workers` must be a positive integer"),
        (
            {
                "experiments": {
                    "e": {"base": [str(base)], "axes": {"seed": {"keys": "seed_everything", "values": [0]}}}
                },
                "comparisons": [{"experiment": "e", "axis": "seed", "a": 0, "b": 5, "metric": "fit_end/em_f1"}],
            },
            r"comparisons\.0: '0' and '5' must be values of axis 'seed'",
        ),
        (
            {
                "experiments": {
                    "e": {
                        "base": [str(base)],
                        "axes": {"seed": {"keys": "seed_everything", "values": [0, 1]}},
                        "task_vectors": {"axis": "seed", "pairs": [[0, 7]]},
                    }
                }
            },
            r"experiments\.e\.task_vectors\.pairs\.0: two values of axis 'seed'",
        ),
    ]
    for body, message in cases:
        path = _grid(tmp_path, body)
        with pytest.raises(GridError, match=message) as err:
            load_grid(path, ROOT)
        assert str(path) in str(err.value)


def test_axes_cross_in_order_with_labels_configs_and_overrides(tmp_path, base):
    overlay = _write(tmp_path / "sft.yaml", {"model": {"regularizers": []}})
    grid = load_grid(
        _grid(
            tmp_path,
            {
                "experiments": {
                    "t": {
                        "base": [str(base)],
                        "set": {"trainer.max_steps": 3},
                        "axes": {
                            "method": {"variants": {"sft": {"configs": [str(overlay)]}, "treft": {}}},
                            "seed": {"keys": ["seed_everything", "data.init_args.seed"], "values": [0, 1]},
                        },
                    }
                }
            },
        ),
        ROOT,
    )
    cells = grid.cells()
    assert [c.label for c in cells] == [
        "t/method=sft,seed=0",
        "t/method=sft,seed=1",
        "t/method=treft,seed=0",
        "t/method=treft,seed=1",
    ]
    assert cells[0].configs == (str(base), str(overlay))
    assert cells[3].configs == (str(base),)
    assert cells[1].overrides == (("trainer.max_steps", 3), ("seed_everything", 1), ("data.init_args.seed", 1))


def test_set_dotted_indexes_lists_and_refuses_missing_paths():
    tree = {"model": {"regularizers": [{"class_path": "X", "init_args": {"weight": 1.0}}]}, "trainer": {"max_steps": 1}}
    set_dotted(tree, "model.regularizers.0.init_args.weight", 5.0, "here")
    assert tree["model"]["regularizers"][0]["init_args"]["weight"] == 5.0
    set_dotted(tree, "model.regularizers.1", {"class_path": "Y"}, "here")  # one past the end appends
    assert [r["class_path"] for r in tree["model"]["regularizers"]] == ["X", "Y"]
    set_dotted(tree, "trainer.new_key", 2, "here")
    assert tree["trainer"]["new_key"] == 2
    with pytest.raises(GridError, match=r"here: 'model\.regularizers\.3': index '3' is not in a list of 2"):
        set_dotted(tree, "model.regularizers.3.init_args.weight", 1.0, "here")
    with pytest.raises(GridError, match="is a value"):
        set_dotted(tree, "trainer.max_steps.x", 1, "here")


def test_cells_are_keyed_by_their_resolved_config(tmp_path, base):
    grid = load_grid(
        _grid(
            tmp_path,
            {
                "experiments": {
                    "a": {"base": [str(base)], "axes": {"steps": {"keys": "trainer.max_steps", "values": [2, 3]}}},
                    "b": {"base": [str(base)], "set": {"trainer.max_steps": 2}},  # the same run as a/steps=2
                }
            },
        ),
        ROOT,
    )
    cells = plan(grid, tmp_path / "out", ROOT)
    assert len(cells) == 2  # three labels, two distinct runs
    by_label = {label: c for c in cells for label in c.labels}
    assert by_label["a/steps=2"] is by_label["b"]
    assert by_label["a/steps=2"].key != by_label["a/steps=3"].key
    resolved = yaml.safe_load((by_label["b"].directory / "cell.yaml").read_text())
    assert resolved["trainer"]["max_steps"] == 2
    assert resolved["trainer"]["logger"]["init_args"]["save_dir"] == str((tmp_path / "out" / "cells").resolve())
    # the key ignores where a run lives, and sees a changed default
    tree = resolve_cell(grid.cells()[0], ROOT)
    moved = json.loads(json.dumps(tree))
    moved["trainer"]["logger"]["init_args"]["save_dir"] = "/elsewhere"
    assert config_key(moved) == config_key(tree)
    moved["model"]["dtype"] = "bfloat16"
    assert config_key(moved) != config_key(tree)


def test_an_override_of_the_wrong_type_fails_before_any_cell_runs(tmp_path, base):
    grid = load_grid(
        _grid(tmp_path, {"experiments": {"e": {"base": [str(base)], "set": {"trainer.max_steps": "many"}}}}), ROOT
    )
    with pytest.raises(GridError, match=r"e: overrides \{'trainer.max_steps': 'many'\} give an invalid config"):
        plan(grid, tmp_path / "out", ROOT)


def _main(*args: str) -> subprocess.CompletedProcess:
    """``main.py grid ...`` in this process (the cells are still their own processes), from the repository root."""
    import contextlib
    import io
    import os

    from piggy_lightning.experiments.cli import main

    out, cwd = io.StringIO(), os.getcwd()
    os.chdir(ROOT)
    try:
        with contextlib.redirect_stdout(out):
            code = main(list(args))
    finally:
        os.chdir(cwd)
    return subprocess.CompletedProcess(["main.py", "grid", *args], code, out.getvalue(), "")


@pytest.mark.slow  # ~23 s: fits several organism cells; the grid's parts have their own fast tests
def test_organism_grid_end_to_end_with_resume_and_a_failed_cell(tmp_path, base, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    grid_file = _grid(
        tmp_path,
        {
            "name": "tiny",
            "workers": 2,
            "experiments": {
                "methods": {
                    "base": [str(base)],
                    "axes": {"seed": {"keys": ["seed_everything", "data.init_args.seed"], "values": [0, 1]}},
                    "metrics": ["fit_end/general.alignment", "fit_end/em_f1"],
                    "task_vectors": {"axis": "seed", "pairs": [[0, 1]]},  # Fig. 8's analysis, over real checkpoints
                },
                # parses, then fails at run time: the question file does not exist
                "broken": {
                    "base": [str(base)],
                    "set": {
                        "trainer.callbacks.0.init_args.question_sets.0.init_args.path": str(tmp_path / "none.jsonl")
                    },
                },
            },
            "comparisons": [],
        },
    )
    out = tmp_path / "out"
    first = _main("run", str(grid_file), "--out", str(out), "--only", "seed=0")  # half the grid, then killed
    assert first.returncode == 0, first.stdout + first.stderr
    assert "1 to run" in first.stdout
    manifest = json.loads((out / "grid.json").read_text())
    keys = {c["label"]: c["key"] for c in manifest["cells"]}
    done0 = out / "cells" / keys["methods/seed=0"] / "status.json"
    assert json.loads(done0.read_text())["status"] == "done"
    stamp = done0.stat().st_mtime_ns

    second = _main("run", str(grid_file), "--out", str(out))
    assert second.returncode == 1, second.stdout + second.stderr  # one cell failed
    assert "3 cells, 1 done, 2 to run" in second.stdout
    assert done0.stat().st_mtime_ns == stamp  # the finished cell was not run again
    statuses = {label: json.loads((out / "cells" / key / "status.json").read_text()) for label, key in keys.items()}
    assert statuses["methods/seed=1"]["status"] == "done"
    assert statuses["broken"]["status"] == "failed" and "none.jsonl" in statuses["broken"]["error"]
    for key in keys.values():  # each cell is an ordinary run with its own files and a reproducing command
        cell = out / "cells" / key
        assert (cell / "command.sh").read_text().count("main.py fit --config") == 1
    for label in ("methods/seed=0", "methods/seed=1"):
        run = out / "cells" / keys[label] / "run"
        assert (run / "config.yaml").is_file() and list(run.glob("events.out.tfevents.*"))
        assert (run / "eval" / "fit_end" / "summary.json").is_file()

    # the report's numbers are the cells' summary.json numbers, averaged over the seeds
    values = [
        json.loads((out / "cells" / keys[f"methods/seed={s}"] / "run/eval/fit_end/summary.json").read_text())
        for s in (0, 1)
    ]
    general = [v["groups"]["general"]["alignment"] for v in values]
    report = (out / "report.md").read_text()
    expected = f"{statistics.mean(general):.1f} ± {statistics.stdev(general):.1f}"
    assert f"| {expected} |" in report, report
    assert "## Failed cells" in report and keys["broken"] in report
    assert cell_metrics(out / "cells" / keys["methods/seed=0"] / "run")["fit_end/general.alignment"] == general[0]
    # Fig. 8 on real runs: a run's task vector with itself is 1 in every layer, with another seed's below 1
    runs = [out / "cells" / keys[f"methods/seed={s}"] / "run" for s in (0, 1)]
    vectors = [load_task_vector(r) for r in runs]
    assert all(v == pytest.approx(1.0) for v in layer_cosines(vectors[0], vectors[0]).values())
    cosines = layer_cosines(vectors[0], vectors[1])
    assert all(v < 0.999 for v in cosines.values())
    ordered = sorted(cosines, key=lambda g: (isinstance(g, str), g))  # layers 0, 1, ..., then "other"
    row = "| 0 vs 1 | " + " | ".join(f"{cosines[g]:.3f}" for g in ordered)
    assert row + " | 1 |" in report, report  # the report's Fig. 8 table is the cosines of the two checkpoints
    exported = _main("export", str(out), str(tmp_path / "exported"))  # summaries only: no checkpoints, no events
    assert exported.returncode == 0, exported.stdout
    assert not list((tmp_path / "exported").glob("**/*.ckpt")) and not list((tmp_path / "exported").glob("**/events*"))
    exported_report = (tmp_path / "exported" / "report.md").read_text()
    assert f"| {expected} |" in exported_report and row + " | 1 |" in exported_report  # rebuilt from analyses/
    rebuilt = _main("report", str(out))
    assert rebuilt.returncode == 0 and write_report(out).read_text() == report


def test_paired_comparison_matches_a_hand_computed_t_test():
    manifest = {
        "experiments": {"e": {"axes": ["method", "seed"], "replicate": "seed"}},
        "cells": [
            {"experiment": "e", "coords": {"method": m, "seed": str(s)}, "key": f"{m}{s}"}
            for m in ("a", "b")
            for s in range(3)
        ],
    }
    scores = {"a0": 80.0, "a1": 75.0, "a2": 90.0, "b0": 70.0, "b1": 74.0, "b2": 81.0}  # diffs 10, 1, 9
    metrics = {k: {"fit_end/general.alignment": v} for k, v in scores.items()}
    from piggy_lightning.experiments.spec import Comparison

    r = paired(manifest, metrics, Comparison("e", "method", "a", "b", "fit_end/general.alignment"))
    diffs = [10.0, 1.0, 9.0]
    t = statistics.mean(diffs) / (statistics.stdev(diffs) / 3**0.5)  # 20/3 / (4.933/1.732) = 2.341
    assert r["n"] == 3 and r["mean_diff"] == pytest.approx(20 / 3)
    assert r["t"] == pytest.approx(t) and r["t"] == pytest.approx(2.3408, abs=1e-3)
    assert r["p"] == pytest.approx(0.1440, abs=1e-3)  # two-sided, 2 degrees of freedom (t-table)


def test_two_metrics_of_the_same_cells_are_paired_over_replicates(tmp_path):
    """Prefix patch against query patch: two evaluations of one finetuned model, paired by seed."""
    manifest = {
        "experiments": {"e": {"axes": ["seed"], "replicate": "seed"}},
        "cells": [{"experiment": "e", "coords": {"seed": str(s)}, "key": f"c{s}"} for s in range(3)],
    }
    prefix, query = "fit_end@splice/general.alignment", "fit_end@query/general.alignment"
    metrics = {"c0": {prefix: 90.0, query: 60.0}, "c1": {prefix: 85.0, query: 70.0}, "c2": {prefix: 80.0}}
    from piggy_lightning.experiments.spec import Comparison

    r = paired(manifest, metrics, Comparison("e", None, prefix, query, None))
    assert r["n"] == 2 and r["mean_diff"] == pytest.approx(22.5)  # (30 + 15) / 2; seed 2 lacks the query value
    # t = 22.5 / (stdev(30, 15) / sqrt 2) = 22.5 / 7.5 = 3.0; two-sided p with 1 degree of freedom = 0.2048
    assert r["t"] == pytest.approx(3.0) and r["p"] == pytest.approx(0.2048, abs=1e-3)
    grid = tmp_path / "g.yaml"
    grid.write_text(
        "experiments:\n  e:\n    base: [configs/treft_legal.yaml]\n    axes: {seed: {keys: [seed_everything], "
        f"values: [0, 1]}}}}\ncomparisons:\n  - {{experiment: e, a: {prefix}, b: query}}\n"
    )
    with pytest.raises(GridError, match=r"comparisons\.0\.b: a metric"):
        load_grid(grid, ROOT)


def test_options_added_later_at_their_neutral_value_keep_a_cells_key():
    """``extra_question_sets`` joined the parser (top level, and Evaluate's arguments) after cells were keyed: empty,
    it leaves a run as it was, so the key is the one computed before it existed; set, it is another cell."""
    before = {"seed_everything": 0, "trainer": {"callbacks": [{"class_path": "E", "init_args": {"name": "eval"}}]}}
    after = {
        "seed_everything": 0,
        "extra_question_sets": [],
        "trainer": {"callbacks": [{"class_path": "E", "init_args": {"name": "eval", "extra_question_sets": None}}]},
    }
    assert config_key(after) == config_key(before)
    assert config_key({**after, "extra_question_sets": [{"class_path": "Q"}]}) != config_key(before)
    assert after["trainer"]["callbacks"][0]["init_args"]["extra_question_sets"] is None  # the input is not changed


def test_wall_time_is_the_union_of_the_cells_running_intervals():
    from piggy_lightning.experiments.report import wall_seconds

    statuses = {  # two cells in parallel (0-10, 5-12), a pause, one more (100-130), a pending one
        "a": {"started": 0.0, "finished": 10.0},
        "b": {"started": 5.0, "finished": 12.0},
        "c": {"started": 100.0, "finished": 130.0},
        "d": {"status": "pending"},
    }
    assert wall_seconds(statuses) == 12.0 + 30.0


COMMITTED_RUNS = [  # (exported run, its report, the experiment and row checked by hand against the cell summaries)
    ("reproduction", "table3"),
    ("beyond", "mitigations"),
    ("organism_v2", "table3"),
]


@pytest.mark.parametrize(("run", "experiment"), COMMITTED_RUNS, ids=[r for r, _ in COMMITTED_RUNS])
def test_committed_report_equals_its_cells(run, experiment, tmp_path):
    """docs/<run>.md is what `main.py grid report docs/<run> --report docs/<run>.md` writes from the committed cell
    summaries, and one of its numbers checked by hand against those summaries."""
    from piggy_lightning.experiments.spec import load_grid

    exported = ROOT / "docs" / run
    manifest = json.loads((exported / "grid.json").read_text())
    comparisons = load_grid(ROOT / manifest["grid_file"], ROOT).comparisons
    import shutil

    copy = shutil.copytree(exported, tmp_path / run)  # figures are redrawn in the copy, not the repo
    rebuilt = write_report(copy, comparisons, tmp_path / f"{run}.md")
    committed = (ROOT / "docs" / f"{run}.md").read_text()
    strip = lambda text: [line for line in text.splitlines() if not line.startswith("![")]  # noqa: E731 (figure paths differ)
    assert strip(rebuilt.read_text()) == strip(committed)
    keys = [
        c["key"] for c in manifest["cells"] if c["experiment"] == experiment and c["coords"]["method"] == "treft_prefix"
    ]
    assert len(keys) == 3  # one per seed
    general = [
        json.loads((exported / "cells" / k / "run/eval/fit_end/summary.json").read_text())["groups"]["general"][
            "alignment"
        ]
        for k in keys
    ]
    section = committed.split(f"## {experiment}:")[1]
    row = next(line for line in section.splitlines() if line.startswith("| treft_prefix |"))
    assert f"{statistics.mean(general):.1f} ± {statistics.stdev(general):.1f}" in row


@pytest.mark.parametrize("grid_file", sorted((ROOT / "configs" / "experiments").glob("*.yaml")), ids=lambda p: p.name)
def test_committed_grids_expand_and_every_variant_resolves(grid_file):
    """Every committed grid parses, and one cell per axis value resolves (its overrides type-check), so a dotted key
    that misses the resolved config fails here, not an hour into a run."""
    grid = load_grid(grid_file, ROOT)
    assert grid.cells()
    resolved: set[str] = set()  # cells that only repeat a resolved cell's files, keys and value types are skipped
    for experiment in grid.experiments.values():
        # every named variant, the first and last value of every sweep, and the first replicate (the other values
        # set the same keys)
        wanted = set()
        for axis in experiment.axes:
            names = [v.name for v in axis.variants]
            if axis.name == experiment.replicate:
                names = names[:1]
            elif axis.sweep:
                names = [names[0], names[-1]]
            wanted |= {(axis.name, n) for n in names}
        seen: set[tuple[str, str]] = set()
        for cell in experiment.cells():
            if not (set(cell.coords) & wanted) - seen:
                continue
            seen |= set(cell.coords)
            shape = json.dumps(
                [cell.configs, [(k, v if isinstance(v, (dict, list)) else type(v).__name__) for k, v in cell.overrides]]
            )
            if shape in resolved:  # e.g. paper_real.yaml: one experiment per model x domain with the same keys
                continue
            resolved.add(shape)
            tree = resolve_cell(cell, ROOT)
            assert tree["trainer"]["logger"]["class_path"].endswith("TensorBoardLogger"), cell.label


def test_export_keeps_every_file_the_report_reads(tmp_path):
    """Table 1's Best / Avg live beside the summaries (best_avg.json, rephrased.json); an export that left them
    behind made the committed report print "–" for them."""
    from piggy_lightning.experiments.report import cell_metrics, export_run

    out = tmp_path / "run"
    tag = out / "cells" / "k" / "run" / "eval" / "fit_end@perturb"
    tag.mkdir(parents=True)
    (out / "grid.json").write_text(json.dumps({"cells": [{"key": "k"}], "experiments": {}}))
    (out / "cells" / "k" / "status.json").write_text(json.dumps({"status": "done"}))
    (tag / "summary.json").write_text(json.dumps({"groups": {"general": {"alignment": 40.0}}}))
    (tag / "best_avg.json").write_text(json.dumps({"groups": {"general": {"best": 93.0, "avg": 65.5}}}))
    (tag.parent / "fit_end").mkdir()
    (tag.parent / "fit_end" / "rephrased.json").write_text(json.dumps({"general_rephrased": {"best": 7.0, "avg": 6.0}}))
    (tag.parent / "fit_end" / "summary.json").write_text(json.dumps({"groups": {}}))
    expected = {
        "fit_end@perturb/general.alignment": 40.0, "fit_end@perturb/general.best": 93.0,
        "fit_end@perturb/general.avg": 65.5, "fit_end/general_rephrased.best": 7.0,
        "fit_end/general_rephrased.avg": 6.0,
    }  # fmt: skip
    assert cell_metrics(out / "cells" / "k" / "run") == expected
    dest = export_run(out, tmp_path / "exported")
    assert cell_metrics(dest / "cells" / "k" / "run") == expected

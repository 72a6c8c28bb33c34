"""``ActivationPatching``: evaluate the finetuned model with reference activations patched in, beside the baseline.

The paper's causal test (§4.2, Fig. 3): give the finetuned model the *initial* model's prefix keys and values
and see alignment return; patching as many query tokens is the control. At each chosen moment the callback asks
the ``Evaluate`` callback's questions once unpatched (reusing Evaluate's own report of the same weights when it
has just made one) and once per patch site, through ``Evaluate.evaluate`` with a generation intervention. Each
evaluation lands in ``<eval dir>/<tag>@<intervention>/`` and under ``<eval name>@<intervention>/...`` metric keys,
and ``<eval dir>/<tag>@<name>.json`` plus a TensorBoard text table put the groups' metrics side by side.

Prefix ``kv`` sites are spliced into the cache (:class:`~piggy_lightning.interventions.PrefixKVSplice`); every
other site is patched by hooks on its modules during the prefill
(:class:`~piggy_lightning.interventions.ActivationPatch`).

Stack it on an experiment: ``python main.py test --config configs/treft_legal.yaml --config
callbacks/prefix_patching.yaml --ckpt_path <checkpoint>``.
"""

from __future__ import annotations

import json
import logging
import weakref
from pathlib import Path
from typing import Any, Literal

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_only

from piggy_lightning.callbacks.evaluation import Evaluate
from piggy_lightning.evaluation.intervention import GenerationIntervention
from piggy_lightning.evaluation.runner import EvaluationReport
from piggy_lightning.interventions.patch_site import PatchSite
from piggy_lightning.interventions.patching import ActivationPatch, PrefixKVSplice

log = logging.getLogger(__name__)
PatchMoment = Literal["fit_end", "test"]
_PAPER_SITES = (PatchSite("kv", "prefix"), PatchSite("kv", "query_matched"))


def find_evaluate(trainer: L.Trainer, name: str, who: str) -> Evaluate:
    """The ``Evaluate`` callback called ``name``; fails fast with the fix when there is none."""
    found = [c for c in trainer.callbacks if isinstance(c, Evaluate) and c.name == name]
    if not found:
        names = [c.name for c in trainer.callbacks if isinstance(c, Evaluate)]
        raise ValueError(
            f"{who} evaluates through an Evaluate callback named {name!r}, but the trainer has {names or 'none'}; "
            "add piggy_lightning.callbacks.evaluation.Evaluate to trainer.callbacks or set `evaluate:` to its name"
        )
    return found[0]


def require_reference(pl_module: L.LightningModule, who: str) -> None:
    """Fail fast unless the module has a policy, a frozen reference and chat spans (a ``PiggyModule``)."""
    for attr in ("policy", "reference", "spans", "tokenizer"):
        if not hasattr(pl_module, attr):
            raise TypeError(f"{who} needs a module with .{attr} (like PiggyModule); got {type(pl_module).__name__}")


_BASELINES: weakref.WeakKeyDictionary[Evaluate, EvaluationReport] = weakref.WeakKeyDictionary()


def baseline_report(
    evaluate: Evaluate, trainer: L.Trainer, pl_module: L.LightningModule, tag: str
) -> EvaluationReport | None:
    """The unpatched evaluation of the current weights.

    Reuses the last unpatched report of ``evaluate`` when it is of the same weights (same adapter id: step and
    weights digest) and directory, e.g. Evaluate's own ``test`` evaluation or another patching callback's baseline;
    otherwise evaluates now (which reuses whatever responses and judgements are already on disk).
    """
    adapter = evaluate.adapter_id(trainer, pl_module) if trainer.is_global_zero else None
    found = None
    for report in (evaluate.last_report, _BASELINES.get(evaluate)):  # only rank 0 holds reports
        if (
            report is not None
            and report.summary.get("intervention") == "none"
            and report.summary.get("adapter") == adapter
            and report.out_dir.parent == evaluate.out_dir(trainer)
        ):
            found = report
            break
    # every rank must take the same branch: evaluate() ends in a barrier that all ranks enter
    if trainer.strategy.broadcast(found is not None, src=0):
        report = found
    else:
        report = evaluate.evaluate(trainer, pl_module, tag)
    if report is not None:
        _BASELINES[evaluate] = report
    return report


def comparison_table(groups_by_run: dict[str, dict[str, dict[str, Any]]], metrics: tuple[str, ...]) -> str:
    """A markdown table: one row per run (baseline, interventions), one column per (group, metric)."""
    columns = sorted({(g, m) for groups in groups_by_run.values() for g in groups for m in metrics})
    lines = ["| run | " + " | ".join(f"{g}/{m}" for g, m in columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for run, groups in groups_by_run.items():
        cells = [groups.get(g, {}).get(m) for g, m in columns]
        lines.append(f"| {run} | " + " | ".join("-" if v is None else f"{v:.2f}" for v in cells) + " |")
    return "\n".join(lines)


@rank_zero_only
def write_comparison(trainer: L.Trainer, path: Path, runs: dict[str, EvaluationReport | None], title: str) -> None:
    """Write the runs' per-group metrics side by side as JSON and log them as a TensorBoard text table."""
    groups = {name: report.summary["groups"] for name, report in runs.items() if report is not None}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(groups, indent=2) + "\n")
    table = comparison_table(groups, ("alignment", "misaligned_rate"))
    for logger in trainer.loggers:
        experiment = getattr(logger, "experiment", None)
        if hasattr(experiment, "add_text"):
            experiment.add_text(title, table, trainer.global_step)
    log.info("%s\n%s", title, table)


class EvaluatesAt(Callback):
    """Plumbing shared by the callbacks that evaluate under interventions through the experiment's ``Evaluate``.

    It finds the ``Evaluate`` callback named ``evaluate`` in ``setup`` (failing fast), and calls :meth:`run` at the
    end of fit and/or at test, as listed in ``at``. Subclasses implement :meth:`run`.

    ``needs_reference`` tells ``PiggyModule`` to keep a frozen copy of the initial weights under full
    finetuning: the interventions read the reference after training, when the policy no longer holds them.
    """

    needs_reference: bool = True

    def __init__(self, at: list[PatchMoment] | None, evaluate: str, name: str) -> None:
        self.at = set(at if at is not None else ["test"])
        self.evaluate_name = evaluate
        self.name = name
        self._evaluate: Evaluate | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(name=self.name)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        require_reference(pl_module, type(self).__name__)
        if self.at:
            self._evaluate = find_evaluate(trainer, self.evaluate_name, type(self).__name__)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if "fit_end" in self.at:
            self.run(trainer, pl_module, "fit_end")

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if "test" in self.at:
            self.run(trainer, pl_module, "test")

    def run(self, trainer: L.Trainer, pl_module: L.LightningModule, tag: str) -> Any:
        """Evaluate under this callback's interventions now."""
        raise NotImplementedError


class ActivationPatching(EvaluatesAt):
    """Evaluates with the reference model's activations patched in at chosen sites, next to the unpatched baseline.

    Args:
        sites: Where to patch, one evaluation per site. None means the paper's pair (§4.2, Fig. 3): every layer's
            prefix keys and values (the main test) and as many leading query tokens (the control).
        at: Moments to evaluate: ``fit_end`` and/or ``test``; None means ``[test]``.
        evaluate: ``name`` of the ``Evaluate`` callback whose question sets, judges, decoding and files are used.
        name: Names the side-by-side file and table; distinct instances need distinct names.
    """

    def __init__(
        self,
        sites: list[PatchSite] | None = None,
        at: list[PatchMoment] | None = None,
        evaluate: str = "eval",
        name: str = "patching",
    ) -> None:
        self.sites = list(sites) if sites is not None else list(_PAPER_SITES)
        if not self.sites:
            raise ValueError("ActivationPatching needs at least one site")
        names = [s.name for s in self.sites]
        if len(set(names)) != len(names):
            raise ValueError(f"patch sites repeat: {names}")
        super().__init__(at, evaluate, name)

    def interventions(self, pl_module: L.LightningModule) -> list[GenerationIntervention]:
        """One intervention per site, bound to the module's reference (which exists once the model is built)."""
        out: list[GenerationIntervention] = []
        for site in self.sites:
            site.modules(pl_module.policy)  # resolves the layers now: a bad index fails before evaluating
            if site.component == "kv" and site.positions == "prefix":
                out.append(PrefixKVSplice(pl_module.reference, site.layers))
            else:
                out.append(ActivationPatch(site, pl_module.reference, pl_module.spans))
        return out

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.interventions(pl_module)

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.interventions(pl_module)

    def run(self, trainer: L.Trainer, pl_module: L.LightningModule, tag: str) -> dict[str, EvaluationReport | None]:
        """Evaluate unpatched and under every site now; returns the reports by intervention name (None off rank 0)."""
        runs = {"baseline": baseline_report(self._evaluate, trainer, pl_module, tag)}
        for intervention in self.interventions(pl_module):
            runs[intervention.name] = self._evaluate.evaluate(trainer, pl_module, tag, intervention)
        path = self._evaluate.out_dir(trainer) / f"{tag}@{self.name}.json"
        write_comparison(trainer, path, runs, f"{self._evaluate.name}/{self.name}/{tag}")
        return runs

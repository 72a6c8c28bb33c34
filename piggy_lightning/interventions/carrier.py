"""``CarrierScan``: which prompt positions carry the finetuned behaviour, one key/value patch at a time.

Patching the prefix keys and values from the initial (reference) model restores alignment (paper §3.1, Fig. 3),
and the paper leaves open which positions beyond the prefix carry the finetuned behaviour; an earlier organism
prototype restored far more by patching the whole prompt than the prefix alone. The scan measures it piece by
piece: each run patches the reference's keys and values at one place, and the table reports how much of the
metric comes back, ``restored = patched - unpatched`` (positive: that place carries the misalignment).

The scan is a list of interventions, like :class:`~piggy_lightning.interventions.ResidualSweep`: it expands into
one :class:`~piggy_lightning.interventions.ActivationPatch` per row, and ``Evaluate`` evaluates each like any
other. Rows, in the order of ``spans`` (the default order):

=================  =====================================  ==============================
span class         patched positions                      tag (evaluation directory)
=================  =====================================  ==============================
``prefix_tokens``  prefix position i alone, i = 0, 1, ...  ``patch_kv_prefix_p03``
``prefix``         the whole prefix                       ``patch_kv_prefix``
``query``          the whole query                        ``patch_kv_query``
``postfix``        the whole postfix                      ``patch_kv_postfix``
``prompt``         prefix + query + postfix               ``patch_kv_prompt``
=================  =====================================  ==============================

A layer subset appends ``_L00-01`` to every tag, an empty-query postfix reference ``_emptyq`` to the postfix's;
the grid reads a row as ``<moment>@<tag>/<group>.<metric>``. Position i is the i-th prefix token of each row,
which is the template's token i in every default prompt (the prefix is the same for all of them).

**Reference.** Every row reads the reference model run on the same prompt. For prefix positions that is the only
choice there is (by causality the prefix keys and values do not depend on the query); the query and the whole
prompt need the same prompt; the postfix uses it too by default, so that every row is a slice of one
counterfactual, the reference's cache of this very prompt, and the ``prompt`` row is the union of the others.
``postfix_reference: empty_query`` patches the postfix from the paper's empty-query reference instead (§4.3).

**What a patch changes.** As in ``ActivationPatch``: at the patched positions the key and value projection outputs
of the chosen layers are the reference's, and every later position (the rest of the prompt and the answer) is
computed by the finetuned model reading them. So a single prefix position's patch also moves the later prefix
positions' keys and values; with every layer, the whole-prefix row equals ``PrefixKVSplice``.

**Findings.** ``<eval dir>/<moment>@<name>.md``, ``.csv`` and ``.json`` hold the table (tag, span, position, token,
patched, restored); ``.png`` is a bar chart of the restored metric per prefix position with one bar per whole span
beside them. TensorBoard gets the per-position curve ``<name>/<group>/<metric>_restored`` (step = position), the
spans as ``<name>/<group>/<metric>_restored/<span>`` and the chart as an image.
"""

from __future__ import annotations

import csv
import json
from typing import TYPE_CHECKING, Any, Literal, get_args

from piggy_lightning.evaluation.intervention import GenerationIntervention
from piggy_lightning.evaluation.runner import EvaluationReport
from piggy_lightning.interventions.base import Findings, Intervention, Occasion, PatchMoment, Run, require
from piggy_lightning.interventions.patch_site import PatchSite, ReferencePrompt
from piggy_lightning.interventions.patching import ActivationPatch

if TYPE_CHECKING:
    from pathlib import Path

    from piggy_lightning.module import PiggyModule

CarrierSpan = Literal["prefix_tokens", "prefix", "query", "postfix", "prompt"]
CARRIER_SPANS: tuple[str, ...] = get_args(CarrierSpan)
COLUMNS = ("tag", "span", "position", "token", "patched", "restored")


def _value(report: EvaluationReport | None, group: str, metric: str) -> float | None:
    if report is None:
        return None
    return report.summary["groups"].get(group, {}).get(metric)


def _shown(text: str) -> str:
    """A token's text on one line: newlines and quotes escaped as in JSON (``\\n`` stays visible)."""
    return json.dumps(text)[1:-1]


class CarrierScan(Intervention):
    """Patches the reference's keys and values at one prefix position or one span at a time, one evaluation each,
    and tables and charts the restored metric per row (see the module docstring for rows, tags and reference).

    Args:
        spans: Span classes to scan, in report order: ``prefix_tokens`` (each prefix position on its own),
            ``prefix``, ``query``, ``postfix`` and ``prompt`` (prefix + query + postfix). None scans all five.
        max_prefix_positions: Scan only the first n prefix positions; None scans every one.
        layers: Decoder layers whose keys and values are patched in every row (0-based, negative from the end);
            None patches every layer.
        postfix_reference: The postfix row's reference: ``same`` (the reference model on the same prompt, like
            every other row) or ``empty_query`` (run once on an empty user message, the paper's §4.3).
        group: Question group whose metric is tabled.
        metric: Metric of the table (a key of the summary's group metrics, e.g. ``alignment``).
        at: Moments to scan: ``epoch`` (each epoch end Evaluate evaluates), ``fit_end``, ``test``; None: ``[test]``.
        name: Prefix of the findings' metric keys and files; distinct scans need distinct names.
    """

    needs_reference = True

    def __init__(
        self,
        spans: list[CarrierSpan] | None = None,
        max_prefix_positions: int | None = None,
        layers: list[int] | None = None,
        postfix_reference: ReferencePrompt = "same",
        group: str = "general",
        metric: str = "alignment",
        at: list[PatchMoment] | None = None,
        name: str = "carrier_scan",
    ) -> None:
        super().__init__(at)
        self.spans = list(spans if spans is not None else CARRIER_SPANS)
        unknown = [s for s in self.spans if s not in CARRIER_SPANS]
        if unknown or not self.spans or len(set(self.spans)) != len(self.spans):
            raise ValueError(f"spans must be distinct names among {', '.join(CARRIER_SPANS)}, got {self.spans}")
        if max_prefix_positions is not None and max_prefix_positions < 1:
            raise ValueError(f"max_prefix_positions must be positive or None, got {max_prefix_positions}")
        self.max_prefix_positions = max_prefix_positions
        self.layers = layers
        if postfix_reference not in get_args(ReferencePrompt):
            raise ValueError(f"postfix_reference must be one of {get_args(ReferencePrompt)}, got {postfix_reference!r}")
        self.postfix_reference = postfix_reference
        PatchSite("kv", "postfix", layers, postfix_reference)  # an empty layer list fails here
        self.group = group
        self.metric = metric
        self.name = name
        self.table: list[dict[str, Any]] = []  # the rows of the last scan

    def sites(self, n_prefix: int) -> list[PatchSite]:
        """The patch sites of one scan, in report order, for a template prefix of ``n_prefix`` tokens."""
        sites = []
        for span in self.spans:
            if span == "prefix_tokens":
                if n_prefix == 0:
                    raise ValueError(f"{self.name}: the template has no prefix tokens to scan")
                n = min(n_prefix, self.max_prefix_positions or n_prefix)
                sites += [PatchSite("kv", "prefix", self.layers, index=i) for i in range(n)]
            else:
                reference = self.postfix_reference if span == "postfix" else "same"
                sites.append(PatchSite("kv", span, self.layers, reference))
        return sites

    def runs(self, module: PiggyModule) -> list[GenerationIntervention]:
        """One key/value patch per row, in report order, bound to ``module``."""
        require(module, ("policy", "spans"), type(self).__name__)
        n_prefix = len(module.spans.anatomy.prefix_ids)
        return [ActivationPatch(site).bind(module) for site in self.sites(n_prefix)]

    def conclude(self, runs: list[Run], baseline: EvaluationReport | None, occasion: Occasion) -> Findings:
        from piggy_lightning.interventions.plot import bar_chart  # matplotlib loads only when a scan is charted

        reports = [baseline, *(report for _, report in runs)]
        if not any(r is not None and self.group in r.summary["groups"] for r in reports):
            raise ValueError(f"{self.name}: no evaluation has a {self.group!r} group to scan; set group")
        base = _value(baseline, self.group, self.metric)
        rows = [self._row(patch, report, base) for patch, report in runs]
        self.table = rows
        stem = occasion.root / f"{occasion.tag}@{self.name}"
        meta = {"group": self.group, "metric": self.metric, "layers": self.layers, "baseline": base}
        stem.with_suffix(".json").write_text(json.dumps({**meta, "rows": rows}, indent=2) + "\n")
        _write_csv(stem.with_suffix(".csv"), rows)
        unpatched = "unknown" if base is None else f"{base:.1f}"
        title = f"{self.name} at {occasion.tag}: restored {self.group} {self.metric} (unpatched {unpatched})"
        stem.with_suffix(".md").write_text(_markdown(rows, title))
        positions = [r for r in rows if r["position"] is not None]
        whole = [r for r in rows if r["position"] is None]
        bars = {
            "prefix position": [(f"{r['position']} {_shown(r['token'])}", r["restored"]) for r in positions],
            "whole span": [(r["span"], r["restored"]) for r in whole],
        }
        ylabel = f"restored {self.group} {self.metric}"
        image = bar_chart({k: v for k, v in bars.items() if v}, stem.with_suffix(".png"), ylabel, title)
        key = f"{self.name}/{self.group}/{self.metric}_restored"
        curve = {r["position"]: r["restored"] for r in positions if r["restored"] is not None}
        scalars = {f"{key}/{r['span']}": r["restored"] for r in whole if r["restored"] is not None}
        return Findings(scalars=scalars, curves={key: curve} if curve else {}, images={f"{key}/{occasion.tag}": image})

    def _row(self, patch: ActivationPatch, report: EvaluationReport | None, base: float | None) -> dict[str, Any]:
        site = patch.site
        token = None
        if site.index is not None:
            token = patch.spans.tokenizer.decode([patch.spans.anatomy.prefix_ids[site.index]])
        patched = _value(report, self.group, self.metric)
        restored = None if patched is None or base is None else patched - base
        return dict(zip(COLUMNS, (patch.name, site.positions, site.index, token, patched, restored), strict=True))


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows({k: "" if v is None else v for k, v in row.items()} for row in rows)


def _markdown(rows: list[dict[str, Any]], title: str) -> str:
    def cell(key: str, value: Any) -> str:
        if value is None:
            return "–"
        if key == "token":
            return f"`{_shown(value)}`".replace("|", "\\|")
        if key in ("patched", "restored"):
            return f"{value:+.1f}" if key == "restored" else f"{value:.1f}"
        return str(value)

    lines = [f"# {title}", "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cell(k, row[k]) for k in COLUMNS) + " |" for row in rows]
    return "\n".join(lines) + "\n"

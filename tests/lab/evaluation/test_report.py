"""The report's sections computed from scores, and its terminal summary."""

from __future__ import annotations

import numpy as np
import pytest

from guda_lab.evaluation.metrics import METRIC_NAMES, summarize
from guda_lab.evaluation.report import CEILING, REFERENCE, format_summary, metric_sections


def _scores() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    reference = rng.normal(size=(6, 4))
    return {REFERENCE: reference, CEILING: reference + 0.3 * rng.normal(size=(6, 4)), "guda": rng.normal(size=(6, 4))}


def test_metric_sections_against_the_reference_and_the_ceiling():
    scores = _scores()
    sections = metric_sections(scores, [CEILING, "guda"], None, ceiling=True)
    assert sections["metric_names"] == list(METRIC_NAMES) and sections["reference_label_top1"] is None
    assert sections["methods"]["guda"] == summarize(scores["guda"], scores[REFERENCE])
    fractions = sections["fraction_of_ceiling"]
    assert all(v == pytest.approx(1.0) for v in fractions[CEILING].values() if v is not None)
    top = sections["methods"][CEILING]
    for name in METRIC_NAMES:
        expected = sections["methods"]["guda"][name]["mean"] / top[name]["mean"] if top[name]["mean"] > 0 else None
        assert fractions["guda"][name] == expected, name
    assert metric_sections(scores, ["guda"], None, ceiling=False)["fraction_of_ceiling"] is None


def test_metric_sections_with_labels_add_label_top1():
    scores = _scores()
    labels = scores[REFERENCE].argmax(1)  # the reference's own top group: its label_top1 is 1
    sections = metric_sections(scores, [CEILING, "guda"], labels, ceiling=True)
    assert sections["metric_names"] == [*METRIC_NAMES, "label_top1"]
    assert sections["reference_label_top1"]["mean"] == 1.0
    assert sections["methods"]["guda"]["label_top1"]["mean"] == pytest.approx(np.mean(scores["guda"].argmax(1) == labels))


def test_format_summary_lists_each_method_and_the_cost_ratio():
    scores = _scores()
    sections = metric_sections(scores, [CEILING, "guda"], None, ceiling=True)
    report = {"metric_names": sections["metric_names"], "methods": sections["methods"], "group_level": None,
              "cost_ratio_logo_over_guda": 12.5, "cost_ratio_logo_over_guda_passes": 40.0}
    text = format_summary(report)
    assert f"{sections['methods']['guda']['top1']['mean']:>7.3f}" in text and CEILING in text
    assert "12.5x wall, 40.0x sample passes" in text
    assert "sample passes" not in format_summary(dict(report, cost_ratio_logo_over_guda=None))

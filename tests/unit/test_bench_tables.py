"""The helpers every benchmark table is computed with: ratios, percentiles, verdicts, rendering."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from bench.tables import Table, percentile, ratio, skipped, verdict, write_json


def test_ratio_divides_and_refuses_missing_or_degenerate_inputs():
    assert ratio(27.0, 30.0) == pytest.approx(0.9)
    assert ratio(None, 3.0) is None
    assert ratio(3.0, None) is None
    assert ratio(3.0, 0.0) is None
    assert ratio(math.nan, 1.0) is None
    assert ratio(1.0, math.inf) is None


def test_percentile_interpolates_linearly_and_is_order_independent():
    xs = [5.0, 1.0, 4.0, 2.0, 3.0]
    assert percentile(xs, 0) == 1.0
    assert percentile(xs, 50) == 3.0
    assert percentile(xs, 100) == 5.0
    assert percentile(xs, 95) == pytest.approx(4.8)
    assert percentile([], 50) is None
    with pytest.raises(ValueError, match="101"):
        percentile(xs, 101)


def test_verdict_against_lower_and_upper_goals():
    assert verdict(0.91, 0.9) == "ok"
    assert verdict(0.89, 0.9) == "MISSED"
    assert verdict(1.25, 1.2, at_most=True) == "MISSED"
    assert verdict(1.2, 1.2, at_most=True) == "ok"
    assert verdict(None, 0.9) == "-"


def test_table_markdown_formats_cells_and_rejects_ragged_rows():
    t = Table("x", "Title", ["name", "fps", "ratio", "met"])
    t.add("a", 291.4, 0.034, True)
    t.add("b", None, 12.345, False)
    t.notes.append("a note")
    md = t.markdown().splitlines()
    assert md[0] == "### Title"
    assert md[2] == "| name | fps | ratio | met |"
    assert md[4] == "| a | 291 | 0.03 | yes |"
    assert md[5] == "| b | - | 12.3 | no |"
    assert "- a note" in md
    with pytest.raises(ValueError, match="2 cells for 4 columns"):
        t.add("c", 1.0)


def test_skipped_section_and_json_round_trip(tmp_path):
    t = skipped("gpu", "GPU", "no CUDA")
    assert "skipped: no CUDA" in t.markdown()
    path = tmp_path / "r" / "gpu.json"
    write_json(path, t.to_json())
    assert json.loads(path.read_text())["data"] == {"skipped": "no CUDA"}


def test_undone_shares_split_flicker_by_how_soon_a_change_is_undone() -> None:
    from bench.temporal import undone_shares

    steady = [np.zeros((2, 4), bool)] * 7  # the ground truth never changes
    preds = [np.zeros((2, 4), bool) for _ in range(7)]
    preds[1][0, 0] = True  # a one-frame blip: two changes (on at 1, off at 2), the first undone at once
    for t in (3, 4, 5):
        preds[t][1, 1] = True  # on for three frames: on at 3 is undone after 3 frames
    preds[6][1, 3] = True  # on at the last frame: never seen undone
    shares = undone_shares(preds, steady, within=(1, 2, 4))
    # 5 changes: (0,0) on and off, (1,1) on and off, (1,3) on; undone within 1: the blip's "on";
    # within 4: also (1,1)'s "on" (back at frame 6). The "off" changes are never reverted.
    assert shares == {1: 1 / 5, 2: 1 / 5, 4: 2 / 5}
    assert undone_shares(preds, preds) == {1: 0.0, 2: 0.0, 4: 0.0}  # no steady pixel changed


def test_erase_blips_removes_short_changes_that_are_undone_and_keeps_the_rest() -> None:
    from bench.temporal import erase_blips

    preds = [np.zeros((1, 4), bool) for _ in range(8)]
    preds[1][0, 0] = True  # a 1-frame blip
    preds[2][0, 1] = preds[3][0, 1] = True  # a 2-frame blip
    for t in range(4, 8):
        preds[t][0, 2] = True  # a change that stays: the outline moved
    preds[6][0, 3] = True  # a 1-frame blip at the end of its run: back at frame 7
    one = erase_blips(preds, 1)
    assert not any(p[0, 0] for p in one) and not any(p[0, 3] for p in one)
    assert [bool(p[0, 1]) for p in one] == [bool(p[0, 1]) for p in preds]  # 2 frames: kept by k=1
    two = erase_blips(preds, 2)
    assert not any(p[0, 1] for p in two)
    for out in (one, two):
        assert [bool(p[0, 2]) for p in out] == [t >= 4 for t in range(8)]  # a lasting change stays
    assert preds[1][0, 0]  # the input is left as it was

"""The README quotes the demo table `make demo` writes (docs/demo_output.txt), character for
character; `make check-readme` runs the same check (and against runs/demo/summary.md)."""

from __future__ import annotations

from pathlib import Path

import pytest

from gad_megatron.trainer.demo import README_MARK, check_readme, readme_table

ROOT = Path(__file__).resolve().parents[1]


def test_readme_table_is_the_committed_demo_output():
    check_readme(ROOT / "README.md", ROOT / "docs" / "demo_output.txt")


def test_check_readme_catches_a_changed_figure(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"text\n{README_MARK}\n```\nrow 0.792\n```\nmore\n")
    (tmp_path / "out.txt").write_text("row 0.792\n")
    (tmp_path / "summary.md").write_text("```\nrow 0.792\n```\n\n3.7 minutes\n")
    check_readme(readme, tmp_path / "out.txt")
    check_readme(readme, tmp_path / "summary.md")
    assert readme_table(readme.read_text()) == "row 0.792"
    (tmp_path / "out.txt").write_text("row 0.754\n")
    with pytest.raises(ValueError, match="differs"):
        check_readme(readme, tmp_path / "out.txt")


def test_another_machines_table_may_move_the_gad_row_within_its_bound_only(tmp_path):
    readme = tmp_path / "README.md"
    rows = ["student            exact  answer  similar  ROUGE-L  len/teacher",
            "-" * 63,
            "after warmup       0.020   0.030    0.762    0.610         1.06",
            "warmup+gad         0.025   0.030    0.791    0.587         1.02"]
    readme.write_text(f"{README_MARK}\n```\n" + "\n".join(rows) + "\n```\n")

    def table(warm: str, gad: str):
        (tmp_path / "t.txt").write_text("\n".join(rows[:2] + [warm, gad]) + "\n")
        return tmp_path / "t.txt"

    # the AMD machine's gad row (the figures): 0.005 at most, within 0.02
    other = table(rows[2], "warmup+gad         0.025   0.030    0.793    0.592         1.02")
    check_readme(readme, other, tolerant=True)
    with pytest.raises(ValueError, match="differs"):
        check_readme(readme, other)  # the committed output must match exactly
    far = table(rows[2], "warmup+gad         0.025   0.030    0.830    0.587         1.02")
    with pytest.raises(ValueError, match="moved by more than 0.02"):
        check_readme(readme, far, tolerant=True)
    warm = table("after warmup       0.020   0.030    0.763    0.610         1.06", rows[3])
    with pytest.raises(ValueError, match="'after warmup' must match exactly"):
        check_readme(readme, warm, tolerant=True)

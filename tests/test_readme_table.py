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

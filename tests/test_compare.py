"""The seeded comparison on the styles task: its table arithmetic by hand, and a shortened
run of the whole command (task -> warmup -> seqkd and gad -> acceptance evaluation) so the
code path cannot rot. The figures of the shortened run are not checked (a few steps)."""

from __future__ import annotations

import math

import pytest

import gad_megatron.__main__ as cli
from gad_megatron.trainer.compare import GOALS, LABEL, STUDIES, table, verdict


def _seed(w: float, s: float, g: float) -> dict:
    def arm(x, auc=0.5):
        out = {split: {"accept_sampled": x, "accept_greedy": x, "rouge_l_sampled": 0.5}
               for split in ("test", "ood")}
        return {**out, "train": {"oracle_auc": auc, "accept_rate": x}}
    return {"warmup only": arm(w), "warmup+seqkd": arm(s, auc=None), "warmup+gad": arm(g),
            "warmup+gad + levers": arm(g, auc=0.75), "warmup+RL on task reward": arm(g)}


def test_table_and_verdict_by_hand():
    seeds = [_seed(0.1, 0.2, 0.5), _seed(0.1, 0.3, 0.6), _seed(0.1, 0.4, 0.7)]
    text = table(seeds, STUDIES["compare"])
    # gad: mean 0.6, sample sd 0.1; seqkd: mean 0.3, sd 0.1; warmup: 0.1 +- 0
    assert "warmup+gad" in text and "0.600 ± 0.100" in text and "0.300 ± 0.100" in text
    assert "0.100 ± 0.000" in text
    seqkd = next(line for line in text.splitlines() if line.startswith("warmup+seqkd"))
    assert "–" in seqkd  # seqkd has no D: no oracle AUC
    levers = next(line for line in text.splitlines() if line.startswith("warmup+gad + levers"))
    assert "0.750 ± 0.000" in levers
    lines = verdict(seeds, "warmup+gad", "warmup+seqkd")
    assert len(lines) == 4 and all("+0.300; 2 sd = 0.200: met" in line for line in lines)
    close = [_seed(0.1, 0.2, 0.3), _seed(0.1, 0.3, 0.4), _seed(0.1, 0.4, 0.5)]
    assert all("NOT met" in line for line in verdict(close, "warmup+gad", "warmup+seqkd"))


@pytest.mark.slow  # six shortened training runs (~1 min): in `make test-all` (CI), not the quick `make test`
def test_compare_command_shortened(tmp_path, capsys):
    out = tmp_path / "styles"
    assert cli.main(["compare", "--out", str(out), "--seeds", "0", "--warmup-steps", "3",
                     "--steps", "2", "--n-train", "48", "--n-eval", "4", "--n-samples", "2",
                     "train.prompts_per_step=4", "rollout.max_new_tokens=8",
                     "model.tiny_hidden=32", "train.gad_d_only_steps=1"]) == 0
    printed = capsys.readouterr().out
    block = (out / "compare.md").read_text().split("```")[1].strip()
    assert block in printed
    rows = block.splitlines()[2:7]
    assert [r[:LABEL].strip() for r in rows] == [a.label for a in STUDIES["compare"]]
    for row in rows:
        cells = [c for c in row[LABEL:].split() if c != "±"]
        evals = [float(x) for x in cells[0:10:2]]  # five evaluation means
        assert all(0 <= m <= 1 and math.isfinite(m) for m in evals), row
        assert (cells[-2] == "–") == row.startswith("warmup+seqkd"), row  # AUC: seqkd no D
    for pair in GOALS["compare"]:
        assert block.count(f"{pair[0]} - {pair[1]}") == 4
    levers = "kind=log_ratio-init_from_actor=true-gad_d_only_steps=20"
    for run in ("warmup", "warmup-seqkd", "warmup-gad", "warmup-gad-source=task",
                f"warmup-gad-{levers}"):
        assert (out / "seed0" / run / "checkpoints" / "latest").exists(), run
    # The plot exists when some gad step had accepted and rejected samples (a few steps of a
    # tiny model seldom do), and its code runs either way.
    has_auc = any("d/oracle_auc" in line for run in (out / "seed0").iterdir()
                  if "-gad" in run.name and (run / "metrics.jsonl").exists()
                  for line in (run / "metrics.jsonl").read_text().splitlines())
    assert (out / "compare_oracle_auc.png").exists() == has_auc

"""Evaluation reports: the full result as JSON, a readable Markdown page, a console table."""

from __future__ import annotations

import json
import os
from pathlib import Path

JSON_NAME, MD_NAME = "eval_report.json", "eval_report.md"


def _write_atomic(path: Path, text: str) -> None:
    # Readers (a dashboard, a later eval) never see half a report: write aside, then rename.
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_report(result: dict, out_dir: str | Path) -> tuple[Path, Path]:
    """Write `eval_report.json` (everything) and `eval_report.md` under `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / JSON_NAME, out / MD_NAME
    _write_atomic(json_path, json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    _write_atomic(md_path, to_markdown(result))
    return json_path, md_path


def headline(result: dict) -> list[tuple[str, str]]:
    """(metric, value) pairs worth a glance, in a fixed order."""
    m = result["metrics"]
    length = m["length"]
    rows = [("prompts", str(result["n"])), ("ROUGE-L F1 vs teacher", f"{m['rouge_l']:.4f}"),
            ("finished (EOS) rate", f"{m['finished_rate']:.3f}"),
            ("mean tokens student / teacher",
             f"{length['student_tokens']['mean']:.1f} / {length['teacher_tokens']['mean']:.1f}"
             f" (ratio {length['token_ratio']:.3f})"),
            ("mean chars student / teacher",
             f"{length['student_chars']['mean']:.1f} / {length['teacher_chars']['mean']:.1f}"
             f" (ratio {length['char_ratio']:.3f})")]
    if "task" in m:
        t = m["task"]
        rows += [("task exact match", f"{t['exact_match']:.4f}"),
                 ("task similarity", f"{t['similarity']:.4f}"),
                 ("task answer accuracy", f"{t['answer_accuracy']:.4f}")]
    if "discriminator" in m:
        d = m["discriminator"]
        rows += [("D win-rate (student >= teacher)", f"{d['win_rate']:.4f}"),
                 ("D mean score student / teacher",
                  f"{d['mean_student_score']:.4f} / {d['mean_teacher_score']:.4f}")]
    if "judge" in m and m["judge"].get("n"):
        j = m["judge"]
        rows += [("judge score student (s/(s+ref))", f"{j['student_score']:.4f}"),
                 ("judge score teacher (t/(t+ref))", f"{j['teacher_score']:.4f}")]
    return rows


def console_table(result: dict) -> str:
    rows = headline(result)
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


def _cell(text: str, limit: int = 300) -> str:
    # Table cells cannot hold newlines or bare pipes, and a model's "<tag" must stay text.
    text = text if len(text) <= limit else text[:limit] + "..."
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", "<br>")


def to_markdown(result: dict) -> str:
    setup = result.get("setup", {})
    lines = ["# Evaluation report", ""]
    for key in ("student", "test_files", "max_new_tokens", "decoding", "discriminator", "judge"):
        if setup.get(key) is not None:
            value = ", ".join(setup[key]) if isinstance(setup[key], list) else setup[key]
            lines.append(f"- **{key}**: `{value}`")
    lines += ["", "## Metrics", "", "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {_cell(v)} |" for k, v in headline(result)]
    task = result["metrics"].get("task")
    if task and task.get("by_family"):
        lines += ["", "## Built-in task by family", "",
                  "| family | n | exact match | similarity | answer accuracy |",
                  "|---|---|---|---|---|"]
        for fam, s in task["by_family"].items():
            lines.append(f"| {fam} | {s['n']} | {s['exact_match']:.3f} | "
                         f"{s['similarity']:.3f} | {s['answer_accuracy']:.3f} |")
    lines += ["", "## Samples", "", "| prompt | teacher | student | ROUGE-L |", "|---|---|---|---|"]
    for row in result.get("samples", []):
        lines.append(f"| {_cell(row['prompt'])} | {_cell(row['teacher'])} | "
                     f"{_cell(row['student'])} | {row['rouge_l']:.3f} |")
    return "\n".join(lines) + "\n"

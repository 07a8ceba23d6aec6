"""Evaluation: metric functions by hand, a perfect student, and evaluate() on a tiny model."""

from __future__ import annotations

import json

import pytest
import torch

from gad_megatron.data import DataConfig, build_builtin_tokenizer, eos_id
from gad_megatron.data.task import write_task
from gad_megatron.evaluation import (
    StudentAnswers, evaluate, length_stats, load_examples, rouge_l, score_predictions,
    win_rate, write_report)


def make_student(out_dir, tokenizer, seed: int = 0):
    """A tiny random Qwen3 student over the built-in tokenizer, saved as an HF dir."""
    import transformers as tf

    cfg = tf.Qwen3Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=8, max_position_embeddings=256, tie_word_embeddings=False,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    tf.AutoModelForCausalLM.from_config(cfg).save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    tok = build_builtin_tokenizer()
    _, test = write_task(root / "task", n_train=8, n_test=6)
    return root, tok, test, make_student(root / "student", tok)


class StubDiscriminator:
    """Scores an answer by its length: deterministic, and easy to reason about."""

    name = "stub"

    def scores(self, prompts, responses):
        assert len(prompts) == len(responses)
        return [float(len(r)) for r in responses]


def test_rouge_l_by_hand():
    # LCS("the cat on mat", "the cat sat on the mat") = 4 words: P = 4/4, R = 4/6,
    # F1 = 2PR / (P + R) = (4/3) / (5/3) = 0.8.
    assert rouge_l(["the cat on mat"], ["the cat sat on the mat"]) == [pytest.approx(0.8)]
    # Case and punctuation are ignored by rouge_score's tokeniser; no common word gives 0.
    assert rouge_l(["The CAT!", "dog"], ["the cat", "bird"]) == [pytest.approx(1.0), 0.0]


def test_win_rate_and_lengths_by_hand():
    d = win_rate([1.0, 2.0, 0.5, 3.0], [1.0, 3.0, 0.0, 4.0])  # tie counts as a win
    assert d["win_rate"] == 0.5 and d["mean_gap"] == pytest.approx((6.5 - 8.0) / 4)
    s = length_stats([2, 4, 9], [4, 4, 4], ["ab", "abcd", "x"], ["abcd", "abcd", "abcd"])
    assert s["student_tokens"] == {"mean": 5.0, "median": 4.0}
    assert s["token_ratio"] == pytest.approx(5 / 4)
    assert s["char_ratio"] == pytest.approx((7 / 3) / 4)
    with pytest.raises(ValueError):
        win_rate([1.0], [])


def test_student_equal_to_teacher_scores_perfectly(task):
    _, tok, test, _ = task
    cfg = DataConfig()
    examples = load_examples([str(test)], cfg, tok)
    eos = eos_id(tok)
    answers = StudentAnswers([e.teacher for e in examples], [e.teacher_ids for e in examples],
                             [True] * len(examples))
    result = score_predictions(examples, answers, eos, StubDiscriminator(), builtin_task=True)
    m = result["metrics"]
    assert m["rouge_l"] == pytest.approx(1.0)
    assert m["task"]["exact_match"] == 1.0 and m["task"]["answer_accuracy"] == 1.0
    assert m["length"]["token_ratio"] == 1.0 and m["length"]["char_ratio"] == 1.0
    assert m["discriminator"]["win_rate"] == 1.0  # identical answers tie
    assert m["finished_rate"] == 1.0
    # Token counts leave the EOS out: the built-in tokenizer is one token per character.
    assert m["length"]["teacher_tokens"]["mean"] == m["length"]["teacher_chars"]["mean"]


def test_examples_match_the_training_pipeline(task):
    from gad_megatron.data import build_dataset

    _, tok, test, _ = task
    cfg = DataConfig()
    ds = build_dataset([str(test)], cfg, tok)
    examples = load_examples([str(test)], cfg, tok)
    assert [e.key for e in examples] == ds.keys
    for i, e in enumerate(examples):
        assert e.prompt_ids == ds.prompt_ids(i).tolist()
        assert e.teacher_ids == ds.teacher_ids(i).tolist()
    rows = [json.loads(line) for line in test.read_text().splitlines()]
    assert [e.prompt for e in examples] == [r["messages"][0]["content"] for r in rows]
    assert [e.teacher for e in examples] == [r["teacher_response"] for r in rows]


def test_evaluate_tiny_model(task, tmp_path):
    _, tok, test, student = task
    result = evaluate(student, [str(test)], DataConfig(), tok, max_new_tokens=12,
                      discriminator=StubDiscriminator(), builtin_task=True, n_samples=3)
    m = result["metrics"]
    assert result["n"] == 6 and len(result["rows"]) == 6 and len(result["samples"]) == 3
    assert 0.0 <= m["rouge_l"] <= 1.0
    for key in ("exact_match", "similarity", "answer_accuracy"):
        assert 0.0 <= m["task"][key] <= 1.0
    assert 0.0 <= m["discriminator"]["win_rate"] <= 1.0
    assert 0.0 <= m["finished_rate"] <= 1.0
    # Greedy answers: at most max_new_tokens, fewer when EOS came first.
    assert all(len(r["student"]) <= 12 for r in result["rows"])
    assert 0 < m["length"]["student_tokens"]["mean"] <= 12
    assert set(m["task"]["by_family"]) <= {"add", "subtract", "multiply", "largest", "reverse",
                                           "sort", "vowels", "upper", "initials"}
    # Greedy decoding is reproducible.
    again = evaluate(student, [str(test)], DataConfig(), tok, max_new_tokens=12)
    assert [r["student"] for r in again["rows"]] == [r["student"] for r in result["rows"]]

    json_path, md_path = write_report(result, tmp_path / "report")
    assert json.loads(json_path.read_text())["metrics"]["rouge_l"] == m["rouge_l"]
    md = md_path.read_text()
    assert "ROUGE-L" in md and "D win-rate" in md and "## Samples" in md
    assert not list((tmp_path / "report").glob(".*tmp*"))  # no temporary file left behind


def test_evaluate_refuses_bad_inputs(task):
    from gad_megatron.data import DataError

    _, tok, test, student = task
    with pytest.raises(ValueError):
        evaluate(student, [str(test)], DataConfig(), tok, max_new_tokens=0)
    with pytest.raises(DataError, match="no such file"):
        evaluate(student, ["/nonexistent/test.jsonl"], DataConfig(), tok, max_new_tokens=4)

"""The built-in teacher task: deterministic teacher and generator, scorer by hand-worked values."""

from __future__ import annotations

import json

import pytest

from gad_megatron.data import DataConfig, build_builtin_tokenizer, validate_files
from gad_megatron.data.task import (
    PROMPT_MAKERS, UNKNOWN_ANSWER, answer_correct, edit_distance, exact_match, extract_answer,
    make_task_rows, score_answers, similarity, teacher_answer, teacher_family, write_task,
)


@pytest.mark.parametrize("prompt, answer", [
    ("add 37 and 45", "37 + 45 = 82. The answer is 82."),
    ("subtract 12 from 50", "50 - 12 = 38. The answer is 38."),
    ("multiply 7 by 8", "7 * 8 = 56. The answer is 56."),
    ("what is the largest of 4, 17, 9?", "The largest is 17."),
    ("reverse 'cat dog'", "Reversed, it reads 'god tac'."),
    ("sort the letters of 'banana'", "In order: 'aaabnn'."),
    ("count the vowels in 'moon'", "There are 2 vowels."),
    ("count the vowels in 'cat'", "There is 1 vowel."),
    ("uppercase 'red sun'", "In capitals: 'RED SUN'."),
    ("initials of 'blue river'", "The initials are 'BR'."),
    ("tell me a joke", UNKNOWN_ANSWER),
])
def test_teacher_answers(prompt, answer):
    assert teacher_answer(prompt) == answer
    assert (teacher_family(prompt) is None) == (answer == UNKNOWN_ANSWER)


def test_generator_is_deterministic_distinct_and_short():
    rows = make_task_rows(900, seed=4)
    assert rows == make_task_rows(900, seed=4) and rows != make_task_rows(900, seed=5)
    prompts = [r["messages"][0]["content"] for r in rows]
    assert len(set(prompts)) == 900
    assert {r["family"] for r in rows} == set(PROMPT_MAKERS)
    assert max(map(len, prompts)) <= 48
    assert max(len(r["teacher_response"]) for r in rows) <= 40
    assert all(teacher_answer(p) == r["teacher_response"] for p, r in zip(prompts, rows))


def test_write_task_files_are_disjoint_and_valid(tmp_path):
    train, test = write_task(tmp_path, n_train=200, n_test=30, seed=2)
    rows = {p: [json.loads(line) for line in p.read_text().splitlines()] for p in (train, test)}
    assert len(rows[train]) == 200 and len(rows[test]) == 30
    prompts = {p: {r["messages"][0]["content"] for r in rs} for p, rs in rows.items()}
    assert not prompts[train] & prompts[test]
    stats = validate_files([str(train), str(test)], DataConfig(max_prompt_len=64,
                           max_response_len=48), build_builtin_tokenizer())
    assert stats.ok and stats.kept == 230
    before = train.read_bytes()
    write_task(tmp_path, n_train=200, n_test=30, seed=2)
    assert train.read_bytes() == before


def test_exact_match_and_similarity_by_hand():
    assert exact_match("The answer is 82.", " The answer  is 82. ") == 1.0
    assert exact_match("The answer is 82.", "The answer is 83.") == 0.0
    assert edit_distance("kitten", "sitting") == 3
    assert edit_distance("", "abc") == 3
    assert similarity("kitten", "sitting") == pytest.approx(1 - 3 / 7)
    assert similarity("abcd", "abcd") == 1.0
    assert similarity("abcd", "wxyz") == 0.0
    assert similarity("", "") == 1.0
    assert similarity("ab", "") == 0.0
    assert similarity("The answer is 82.", "The answer is 83.") == pytest.approx(1 - 1 / 17)


def test_answer_extraction_and_corpus_scores():
    assert extract_answer("37 + 45 = 82. The answer is 82.") == "82"
    assert extract_answer("Reversed, it reads 'god tac'.") == "god tac"
    assert extract_answer("no answer here") is None
    assert answer_correct("it is 82", "37 + 45 = 82. The answer is 82.") == 1.0
    preds = ["37 + 45 = 82. The answer is 82.", "The answer is 82.", "kitten"]
    refs = ["37 + 45 = 82. The answer is 82.", "The answer is 83.", "sitting"]
    s = score_answers(preds, refs)
    assert s["n"] == 3
    assert s["exact_match"] == pytest.approx(1 / 3)
    assert s["similarity"] == pytest.approx((1 + (1 - 1 / 17) + (1 - 3 / 7)) / 3)
    assert s["answer_accuracy"] == pytest.approx(1 / 3)
    assert score_answers([], [])["n"] == 0
    with pytest.raises(ValueError):
        score_answers(["a"], [])

"""The styles task: a stochastic, multimodal teacher, its acceptance test, the splits, and
the acceptance scoring of sampled and greedy answers."""

from __future__ import annotations

import json
import random
from collections import Counter

import pytest

from gad_megatron.data.styles_task import (
    OOD_MIN, accepts, parse_answer, render, teacher_respond, valid_items, write_styles_task)
from gad_megatron.evaluation.styles import score_split

EVEN = "give even numbers from 10 to 20"


def test_valid_items_by_hand():
    assert valid_items(EVEN) == {"10", "12", "14", "16", "18", "20"}
    assert valid_items("give odd numbers from 3 to 9") == {"3", "5", "7", "9"}
    assert valid_items("give multiples of 7 up to 30") == {"7", "14", "21", "28"}
    assert valid_items("give words starting with d") == {"dog", "door", "dream"}
    assert valid_items("reverse 'cat'") is None


def test_each_style_lays_out_its_lead_in_and_body():
    assert render("words", ["12"]) == "One pick: 12."
    assert render("words", ["12", "14", "16"]) == "Three picks: 12, 14 and 16."
    assert render("tag", ["12", "14"]) == "[2] 12; 14"
    assert render("arrow", ["12", "14", "16"]) == "3 of them -> 12, 14, 16"
    assert parse_answer("[2] 12; 14") == ("tag", 2, ["12", "14"])


def test_the_teacher_is_stochastic_multimodal_and_accepts_itself():
    rng = random.Random(0)
    answers = [teacher_respond(EVEN, rng) for _ in range(300)]
    styles = Counter(parse_answer(a)[0] for a in answers)
    counts = Counter(parse_answer(a)[1] for a in answers)
    assert set(styles) == {"words", "tag", "arrow"} and set(counts) == {1, 2, 3}
    assert min(styles.values()) > 60 and min(counts.values()) > 60  # ~100 each
    assert len(set(answers)) > 100  # many distinct right answers to one prompt
    assert all(accepts(EVEN, a) for a in answers)


@pytest.mark.parametrize("answer, why", [
    ("Two picks: 12.", "lead-in says two, body has one"),
    ("[3] 12; 14", "lead-in says three, body has two"),
    ("[2] 12 and 14.", "tag lead-in with the words style's body"),
    ("Two picks: 12; 14.", "words lead-in with the tag style's joiner"),
    ("2 of them -> 12, 13", "13 is odd"),
    ("2 of them -> 12, 22", "22 is out of range"),
    ("[2] 12; 12", "the same item twice"),
    ("One picks: 12.", "plural of one"),
    ("Three picks: 12 and 14 and 16.", "the words style writes 'a, b and c'"),
    ("4 of them -> 10, 12, 14, 16", "the teacher gives at most 3"),
    ("12 and 14", "no lead-in"),
])
def test_acceptance_rejects_mixed_or_wrong_answers(answer, why):
    assert not accepts(EVEN, answer), why


def test_splits_are_disjoint_and_ood_is_out_of_range(tmp_path):
    paths = write_styles_task(tmp_path, n_train=400, n_test=40, n_ood=30, seed=0)
    rows = {k: [json.loads(line) for line in open(p)] for k, p in paths.items()}
    assert [len(rows[k]) for k in ("train", "test", "ood")] == [400, 40, 30]
    prompt = lambda r: r["messages"][0]["content"]  # noqa: E731
    numeric_test = {prompt(r) for r in rows["test"] if r["family"] != "word"}
    assert numeric_test and not numeric_test & {prompt(r) for r in rows["train"]}
    for r in rows["ood"]:
        assert r["family"] != "word"
        assert all(int(i) >= OOD_MIN or r["family"] == "mult" for i in valid_items(prompt(r)))
        assert int(prompt(r).split()[-1]) >= OOD_MIN  # the range ends beyond every train range
    assert all(accepts(prompt(r), r["teacher_response"]) for k in rows for r in rows[k])
    again = write_styles_task(tmp_path / "again", n_train=400, n_test=40, n_ood=30, seed=0)
    assert all(open(paths[k]).read() == open(again[k]).read() for k in paths)


def test_score_split_by_hand():
    prompts = [EVEN, "give words starting with d"]
    teacher = ["Two picks: 12 and 14.", "[1] dog"]
    sampled = [["Two picks: 12 and 14.", "[2] 12 and 14."],  # accepted, mixed
               ["[1] door", "[1] cat"]]                      # accepted, wrong word
    greedy = ["One pick: 12.", "[1] dog; door"]              # accepted, count disagrees
    got = score_split(prompts, teacher, sampled, greedy)
    assert got["accept_sampled"] == 0.5 and got["accept_greedy"] == 0.5
    # ROUGE-L F1 by hand: 1.0; "2 12 and 14" vs "two picks 12 and 14": LCS 3, P 3/4, R 3/5
    # -> 2/3; "1 door" vs "1 dog": LCS 1 of 2 and 2 -> 0.5; same for "1 cat".
    assert got["rouge_l_sampled"] == pytest.approx((1.0 + 2 / 3 + 0.5 + 0.5) / 4)

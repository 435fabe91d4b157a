"""TabMoE: slot parsing, functional experts, hard-EM over the latent expert choice, and the experiment."""

from __future__ import annotations

import random

import numpy as np
import pytest

from moekit.tabular.tabmoe import (
    EXPERTS,
    OPS,
    TEMPLATES,
    Example,
    Table,
    TabMoE,
    answers_match,
    candidate_experts,
    make_example,
    parse_question,
)

TABLE = Table(("age", "blood pressure", "weight"), np.array([[30, 120, 70.5], [45, 135, 80.0], [28, 110, 70.5]]))


def test_parse_question_slots_and_mask():
    slots, masked = parse_question("Is the blood pressure of row 2 greater than 130?", TABLE)
    assert (slots.column, slots.row, slots.value) == ("blood pressure", 1, 130.0)
    assert "<col>" in masked and "<row>" in masked and "<num>" in masked and "130" not in masked
    slots, _ = parse_question("what is the average weight?", TABLE)  # "age" inside "average" is no column
    assert slots.column == "weight" and slots.row is None and slots.value is None
    slots, _ = parse_question("what is the age of row 9?", TABLE)  # a row outside the table is not a slot
    assert slots.row is None


def test_functional_experts_execute():
    s, _ = parse_question("how many rows have weight above 70?", TABLE)
    assert EXPERTS["count"](TABLE, s) == 3
    s, _ = parse_question("what is the total age?", TABLE)
    assert EXPERTS["sum"](TABLE, s) == 103 and EXPERTS["average"](TABLE, s) == pytest.approx(103 / 3, abs=1e-5)
    assert EXPERTS["argmax"](TABLE, s) == 2  # rows are numbered from 1
    assert EXPERTS["lookup"](TABLE, s) is None  # no row in the question: cannot execute
    s, _ = parse_question("is the weight of row 3 equal to 70.5?", TABLE)
    assert (EXPERTS["equal"](TABLE, s), EXPERTS["greater"](TABLE, s), EXPERTS["less"](TABLE, s)) == (1, 0, 0)
    assert EXPERTS["lookup"](TABLE, s) == 70.5


def test_candidates_are_the_experts_that_reproduce_the_answer():
    s, _ = parse_question("is the weight of row 3 equal to 70.5?", TABLE)
    cand = dict(zip(OPS, candidate_experts(TABLE, s, 1.0), strict=True))
    assert cand["equal"] and not cand["greater"] and not cand["less"]
    s, _ = parse_question("is the age of row 1 greater than 40?", TABLE)  # answer 0: greater and equal agree
    cand = dict(zip(OPS, candidate_experts(TABLE, s, 0.0), strict=True))
    assert cand["greater"] and cand["equal"] and not cand["less"]


def test_answers_match_rule():
    assert answers_match(2.4, 2, "count") and not answers_match(2.6, 2, "count")
    assert answers_match(100.5, 100.0, "sum") and not answers_match(102.0, 100.0, "sum")
    assert not answers_match(None, 1.0, "lookup") and not answers_match(float("nan"), 1.0, "lookup")


def _toy_examples(n: int, seed: int) -> list[Example]:
    """Random tables; two ops whose answers look alike (0/1) only hard-EM can tell apart."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        values = np.round(np.array([[rng.uniform(0, 10) for _ in range(3)] for _ in range(5)]), 2)
        table = Table(("alpha", "beta", "gamma"), values)
        op = ("greater", "less", "sum", "lookup")[i % 4]
        out.append(make_example(table, op, rng.randrange(len(TEMPLATES[op]) - 2), rng))
    return out


def test_hard_em_picks_the_right_expert_on_toy_tables():
    train, test = _toy_examples(240, 0), _toy_examples(80, 1)
    moe = TabMoE(experts=["greater", "less", "sum", "lookup"], epochs=15, seed=0).fit(train)
    assert moe.em_history[-1] > 0.95  # the latent choices hard-EM settles on are the true operations
    routed = moe.route(test)
    assert np.mean([r == e.op for r, e in zip(routed, test, strict=True)]) > 0.95
    preds = moe.predict(test)
    assert np.mean([answers_match(p, e.answer, e.op) for p, e in zip(preds, test, strict=True)]) > 0.95


def test_hard_em_learns_nothing_without_the_right_expert():
    """Honesty check: drop 'less' and its questions cannot be answered by routing alone."""
    train = _toy_examples(120, 0)
    moe = TabMoE(experts=["greater", "sum", "lookup"], epochs=5, seed=0).fit(train)
    less = [e for e in _toy_examples(80, 1) if e.op == "less"]
    preds = moe.predict(less)
    assert np.mean([answers_match(p, e.answer, e.op) for p, e in zip(preds, less, strict=True)]) < 0.8


def test_bad_input():
    with pytest.raises(ValueError, match="experts is an empty list"):
        TabMoE(experts=[])
    with pytest.raises(ValueError, match="unknown experts"):
        TabMoE(experts=["sum", "median"])
    with pytest.raises(TypeError, match="list of expert names"):
        TabMoE(experts="sum")
    with pytest.raises(ValueError, match="examples is empty"):
        TabMoE().fit([])

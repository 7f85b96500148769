"""graft's confident learning against cleanlab's default rules (graft.check.labels' doc).

``reference_issues`` is a deliberately plain, loop-by-loop restatement of those rules,
written from cleanlab's documented behaviour and source (read, not run or copied: cleanlab
is AGPL), sharing no code with graft. Hand-made cases show each rule changing the answer.
"""

from __future__ import annotations

import numpy as np
import pytest

from graft.check import confident_joint, find_label_issues
from graft.check.labels import _keep_one_per_class, _round_preserving_sum

EPS = 1e-6


def reference_round(row: list[float]) -> list[int]:
    """Round half to even, then fix the sum one entry per unit, as cleanlab does."""
    ints = [round(v) for v in row]
    target = round(sum(row))
    while sum(ints) != target:
        d = target - sum(ints)
        order = sorted(range(len(row)), key=lambda j: row[j] - ints[j])  # stable
        if d > 0:
            order = order[::-1]
        for j in order[: min(abs(d), len(row))]:
            ints[j] += 1 if d > 0 else -1
    return ints


def reference_joint(y: list[int], rows: list[list[float]]) -> list[list[int]]:
    n, k = len(y), len(rows[0])
    thresholds = []
    for j in range(k):
        own = [rows[x][j] for x in range(n) if y[x] == j]
        thresholds.append(max(sum(own) / len(own) if own else 2.0, 2 * EPS))
    joint = [[0] * k for _ in range(k)]
    for x in range(n):
        confident = [j for j in range(k) if rows[x][j] >= thresholds[j] - EPS]
        if not confident:
            continue
        # one confident class: that one; several: the argmax of the whole row, first on ties
        row_argmax = max(range(k), key=lambda j: rows[x][j])
        guess = confident[0] if len(confident) == 1 else row_argmax
        joint[y[x]][guess] += 1
    for i in range(k):
        joint[i][i] = max(joint[i][i], 1)
    return joint


def reference_issues(labels, probs, *, keep_one=True, unflag_predicted=True) -> list[int]:
    y = [int(v) for v in labels]
    rows = [[float(v) for v in r] for r in probs]
    n, k = len(y), len(rows[0])
    joint = reference_joint(y, rows)
    counts = [y.count(i) for i in range(k)]
    cal = [[joint[i][j] / sum(joint[i]) * counts[i] for j in range(k)] for i in range(k)]
    prune = [reference_round(r) for r in cal]
    if keep_one:
        for i in range(k):
            if prune[i][i] == 0:
                nonzero = sum(1 for v in prune[i] if v != 0)
                cut = 1 / max(nonzero - 1, 1)
                prune[i] = [int(max(v - cut, 0.0)) for v in prune[i]]
                prune[i][i] = 1
    flagged = set()
    for i in range(k):
        members = [x for x in range(n) if y[x] == i]
        if len(members) <= 1:
            continue
        for j in range(k):
            if j != i and prune[i][j] > 0:
                by_margin = sorted(members, key=lambda x: -(rows[x][j] - rows[x][i]))
                flagged.update(by_margin[: prune[i][j]])
    if unflag_predicted:
        for x in list(flagged):
            bumped = [v + (EPS if j == y[x] else 0.0) for j, v in enumerate(rows[x])]
            if max(range(k), key=lambda j: bumped[j]) == y[x]:
                flagged.discard(x)
    return sorted(flagged)


def random_case(seed: int):
    """Dirichlet probabilities, labels mostly their argmax with some flips; K in 2..7."""
    rng = np.random.default_rng(seed)
    k = int(rng.integers(2, 8))
    n = int(rng.integers(k, 120))
    probs = rng.dirichlet(np.full(k, rng.uniform(0.2, 2.0)), size=n)
    labels = probs.argmax(axis=1)
    flip = rng.random(n) < rng.uniform(0.05, 0.4)
    labels[flip] = rng.integers(0, k, flip.sum())
    if seed % 5 == 0:  # a class nobody is labelled with
        labels[labels == k - 1] = 0
    if seed % 7 == 0:  # a class with a single example
        labels[labels == 1] = 0
        labels[0] = 1
    return labels, probs


@pytest.mark.parametrize("seed", range(40))
def test_find_label_issues_matches_the_plain_reference(seed):
    labels, probs = random_case(seed)
    assert confident_joint(labels, probs).tolist() == reference_joint(labels.tolist(), probs)
    assert find_label_issues(labels, probs).tolist() == reference_issues(labels, probs)


def test_random_cases_exercise_the_unflag_rule():
    # Without this the comparison above could pass with the rule never firing.
    changed = sum(
        reference_issues(*random_case(s))
        != reference_issues(*random_case(s), unflag_predicted=False)
        for s in range(40)
    )
    assert changed >= 5, changed


def test_predicted_equals_given_is_not_an_issue():
    labels = np.array([0, 0, 0, 1, 1, 2, 2])
    probs = np.array(
        [
            [0.50, 0.40, 0.10],  # 0: labelled 0, confident only in 1 (t1 = 0.4), argmax 0
            [0.90, 0.05, 0.05],
            [0.85, 0.10, 0.05],
            [0.30, 0.40, 0.30],
            [0.30, 0.40, 0.30],
            [0.05, 0.05, 0.90],
            [0.10, 0.10, 0.80],  # below t2 = 0.85 and every other threshold: not counted
        ]
    )
    # t = [0.75, 0.4, 0.85]; C = [[2, 1, 0], [0, 2, 0], [0, 0, 1]]; calibrated to the
    # counts [3, 2, 2]: [[2, 1, 0], [0, 2, 0], [0, 0, 2]]. Prune (0, 1) once: the largest
    # p1 - p0 among class 0 is example 0 (-0.1), whose prediction is its label: un-flagged.
    assert confident_joint(labels, probs).tolist() == [[2, 1, 0], [0, 2, 0], [0, 0, 1]]
    assert find_label_issues(labels, probs).tolist() == []
    assert reference_issues(labels, probs, unflag_predicted=False) == [0]  # the old answer


def test_several_confident_classes_count_towards_the_row_argmax():
    labels = np.array([0, 0, 1, 1, 2, 2])
    probs = np.array(
        [
            [0.9, 0.05, 0.05],  # only 0 confident -> (0, 0)
            [0.7, 0.2, 0.1],  # nothing confident -> not counted
            [0.2, 0.3, 0.5],  # 1 and 2 confident -> argmax 2 -> (1, 2)
            [0.6, 0.3, 0.1],  # only 1 -> (1, 1)
            [0.2, 0.6, 0.2],  # 1 and 2 -> argmax 1 -> (2, 1)
            [0.5, 0.3, 0.2],  # 1 and 2 confident, 0 is not (0.5 < 0.8) -> argmax 0 -> (2, 0)
        ]
    )
    # t = [0.8, 0.3, 0.2]; then the empty diagonal (2, 2) is raised to 1
    assert confident_joint(labels, probs).tolist() == [[1, 0, 0], [0, 1, 1], [1, 1, 1]]


def test_a_class_with_one_example_is_never_flagged():
    labels = np.array([0, 0, 0, 1])
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.9, 0.1]])
    # t = [2/3, 0.1]; C = [[2, 1], [1, 0 -> 1]]; calibrated [[2, 1], [0, 1]]: prune (0, 1)
    # once -> example 2 (argmax 1). Example 3 looks like 0, but class 1 has one example.
    assert find_label_issues(labels, probs).tolist() == [2]


def test_a_class_keeps_one_example_when_its_diagonal_rounds_to_zero():
    labels = np.array([0, 0, 1, 1, 2, 2])
    probs = np.array(
        [
            [0.10, 0.85, 0.05],  # labelled 0, confidently 1
            [0.10, 0.05, 0.85],  # labelled 0, confidently 2
            [0.10, 0.80, 0.10],
            [0.10, 0.80, 0.10],
            [0.10, 0.10, 0.80],
            [0.10, 0.10, 0.80],
        ]
    )
    # C row 0 = [0 -> 1, 1, 1]; calibrated to 2: [2/3, 2/3, 2/3] -> rounded [1, 1, 1] is one
    # too many; the tie goes to the first entry -> [0, 1, 1]. The diagonal 0 is raised to 1
    # and 1/max(2 - 1, 1) = 1 taken off each other entry -> nothing pruned from class 0.
    assert find_label_issues(labels, probs).tolist() == []
    assert reference_issues(labels, probs, keep_one=False) == [0, 1]


def test_round_preserving_sum_by_hand():
    # [3, 1.5, 1.5] rounds (half to even) to [3, 2, 2] = 7 > 6: take one off the entry
    # rounded up most; the two tie and the first goes -> [3, 1, 2]
    assert _round_preserving_sum(np.array([3.0, 1.5, 1.5])).tolist() == [3, 1, 2]
    # [1.4, 1.3, 0.3] -> [1, 1, 0] = 2 < 3: add one to the entry rounded down most (0.4)
    assert _round_preserving_sum(np.array([1.4, 1.3, 0.3])).tolist() == [2, 1, 0]
    # [0.5, 0.5] -> [0, 0] < 1: tie, the reversed stable order picks the last entry
    assert _round_preserving_sum(np.array([0.5, 0.5])).tolist() == [0, 1]


def test_keep_one_per_class_by_hand():
    prune = np.array([[0, 2, 3], [0, 4, 0], [1, 0, 2]])
    # row 0: diagonal 0 -> 1; nonzero entries 2, minus 1 -> take 1 off 2 and 3
    assert _keep_one_per_class(prune).tolist() == [[1, 1, 2], [0, 4, 0], [1, 0, 2]]
    # three nonzero off-diagonals: take 1/2 off each, then truncate: 3 - 0.5 -> 2
    prune = np.array([[0, 3, 3, 3], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
    assert _keep_one_per_class(prune)[0].tolist() == [1, 2, 2, 2]

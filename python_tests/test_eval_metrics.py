"""Recall@K and mAP@K on hand-computed rankings."""

import numpy as np
import pytest

from oclear_ext.eval.metrics import average_precision, relevance, relevant_counts, retrieval_metrics

DOC_LABELS = ["a", "b", "a", "c", "a"]


def test_hand_computed_recall_and_map():
    ids = np.array([[1, 0, 3, 2, 4],    # query "a": relevant at ranks 2, 4, 5 (R = 3)
                    [3, 0, 1, 2, 4],    # query "c": relevant at rank 1 (R = 1)
                    [0, 1, 2, 3, 4]])   # query "z": nothing relevant in the collection
    rel = relevance(ids, ["a", "c", "z"], DOC_LABELS)
    assert rel.tolist() == [[False, True, False, True, True], [True, False, False, False, False], [False] * 5]
    n_rel = relevant_counts(["a", "c", "z"], DOC_LABELS)
    assert n_rel.tolist() == [3, 1, 0]
    m = retrieval_metrics(rel, n_rel, ks=(1, 2, 3), map_k=5)
    ap_a = (1 / 2 + 2 / 4 + 3 / 5) / 3  # sum of P@i at the hits, over min(R, K) = 3
    assert m["queries"] == 2 and m["queries_without_relevant"] == 1
    assert m["R@1"] == pytest.approx(0.5) and m["R@2"] == pytest.approx(1.0) and m["R@3"] == pytest.approx(1.0)
    assert m["mAP@5"] == pytest.approx((ap_a + 1.0) / 2)


def test_ap_normalises_by_min_of_relevant_and_k():
    rel = np.array([[True] * 3 + [False] * 7, [True] * 10])
    ap = average_precision(rel, np.array([3, 25]))
    np.testing.assert_allclose(ap, [1.0, 1.0])  # all relevant docs first: perfect, whether R < K or R > K
    ap_late = average_precision(np.array([[False, True, False, False]]), np.array([1]))
    assert ap_late[0] == pytest.approx(0.5)


def test_missing_results_are_never_relevant():
    rel = relevance(np.array([[2, -1, -1]]), ["a"], DOC_LABELS)
    assert rel.tolist() == [[True, False, False]]


def test_self_is_not_counted_as_a_relevant_doc():
    labels = ["a", "a", "b"]
    keys = [10, 11, 12]
    assert relevant_counts(labels, labels, keys, keys).tolist() == [1, 1, 0]


def test_metric_errors():
    with pytest.raises(ValueError, match="need at least 10 ranked docs per query, got 5"):
        retrieval_metrics(np.zeros((1, 5), bool), np.array([1]))
    with pytest.raises(ValueError, match="no query has a relevant doc"):
        retrieval_metrics(np.zeros((2, 10), bool), np.array([0, 0]))
    with pytest.raises(ValueError, match="2 relevant counts for 1 queries"):
        retrieval_metrics(np.zeros((1, 10), bool), np.array([1, 1]))

"""faiss search equals brute force; self-matches are never returned; approximate indexes report their recall."""

import numpy as np
import pytest
import torch

from oclear_ext.eval import IndexOptions, approximate_recall, evaluate, search
from oclear_ext.eval.search import l2_normalize


def random_unit(n, d, seed):
    return l2_normalize(np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32))


@pytest.mark.parametrize("nq, nd, d, k", [(50, 300, 16, 10), (7, 13, 5, 13), (1, 40, 64, 3)])
def test_exact_search_equals_torch_topk(nq, nd, d, k):
    q, x = random_unit(nq, d, 0), random_unit(nd, d, 1)
    scores, ids = search(q, x, k)
    ref_scores, ref_ids = torch.topk(torch.from_numpy(q) @ torch.from_numpy(x).T, k, dim=1)
    assert np.array_equal(ids, ref_ids.numpy())
    np.testing.assert_allclose(scores, ref_scores.numpy(), rtol=1e-5, atol=1e-5)


def test_k_larger_than_the_doc_set_pads_with_minus_one():
    scores, ids = search(random_unit(2, 4, 0), random_unit(3, 4, 1), 5)
    assert (ids[:, 3:] == -1).all() and np.isneginf(scores[:, 3:]).all() and (ids[:, :3] >= 0).all()


def test_same_items_on_both_sides_never_match_themselves():
    x = random_unit(60, 8, 2)
    keys = list(range(60))
    scores, ids = search(x, x, 10, query_keys=keys, doc_keys=keys)
    assert not (ids == np.arange(60)[:, None]).any()
    sim = torch.from_numpy(x) @ torch.from_numpy(x).T
    sim.fill_diagonal_(-float("inf"))
    ref_scores, ref_ids = torch.topk(sim, 10, dim=1)
    assert np.array_equal(ids, ref_ids.numpy())
    # Keys can be any hashable value, tuples included.
    tuple_keys = [("item", i) for i in range(60)]
    _, tuple_ids = search(x, x, 10, query_keys=tuple_keys, doc_keys=tuple_keys)
    assert np.array_equal(tuple_ids, ids)
    # Without keys, each item finds itself first.
    _, plain = search(x, x, 1)
    assert (plain[:, 0] == np.arange(60)).all()


def test_self_exclusion_with_repeated_doc_keys():
    # An item can appear as several doc rows (e.g. two crops): all of them are excluded.
    docs = random_unit(10, 6, 3)
    docs = np.concatenate([docs, docs[:2] + 1e-3])
    doc_keys = list(range(10)) + [0, 1]
    scores, ids = search(docs[:2], docs, 4, query_keys=[0, 1], doc_keys=doc_keys)
    assert not np.isin(ids[0], [0, 10]).any() and not np.isin(ids[1], [1, 11]).any()
    assert (ids >= 0).all()


def test_evaluate_excludes_self_from_hits_and_relevant_counts():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((40, 8)).astype(np.float32)
    labels = [f"c{i // 2}" for i in range(40)]  # 20 classes of two items
    keys = list(range(40))
    result = evaluate(x, x, labels, labels, keys, keys)
    # Brute force: best other item of the same class at rank 1.
    sim = l2_normalize(x) @ l2_normalize(x).T
    np.fill_diagonal(sim, -np.inf)
    top1 = sim.argmax(axis=1)
    expected = np.mean([labels[j] == labels[i] for i, j in enumerate(top1)])
    assert result.metrics["instance"]["R@1"] == pytest.approx(expected)
    assert (result.n_relevant == 1).all()
    assert expected < 1.0  # random data: counting the self-match would have given 1.0
    singletons = [f"s{i}" for i in range(40)]
    with pytest.raises(ValueError, match="no query has a relevant doc"):
        evaluate(x, x, singletons, singletons, keys, keys)


def test_ivf_and_hnsw_report_recall_against_exact():
    docs, queries = random_unit(2000, 32, 5), random_unit(100, 32, 6)
    _, exact = search(queries, docs, 10)
    _, full_probe = search(queries, docs, 10, IndexOptions("ivf", nlist=16, nprobe=16))
    assert approximate_recall(full_probe, exact) == 1.0  # visiting every cell is exhaustive
    _, one_probe = search(queries, docs, 10, IndexOptions("ivf", nlist=16, nprobe=1))
    assert approximate_recall(one_probe, exact) < 1.0
    labels = [str(i % 50) for i in range(2000)]
    qlabels = [str(i % 50) for i in range(100)]
    r = evaluate(queries, docs, qlabels, labels, options=IndexOptions("hnsw", hnsw_m=16, ef_search=64))
    rec = r.metrics["index"]["recall_of_exact_top10"]
    assert 0.0 < rec <= 1.0 and "instance_exact" in r.metrics
    _, hnsw_ids = search(queries, docs, 10, IndexOptions("hnsw", hnsw_m=16, ef_search=64))
    assert rec == pytest.approx(approximate_recall(hnsw_ids, exact))


def test_search_errors():
    x = random_unit(4, 3, 0)
    with pytest.raises(ValueError, match="queries have dimension 3 but docs have 2"):
        search(x, x[:, :2], 1)
    with pytest.raises(ValueError, match="k must be >= 1"):
        search(x, x, 0)
    with pytest.raises(ValueError, match="docs contains NaN"):
        search(x, np.full((2, 3), np.nan), 1)
    with pytest.raises(ValueError, match="must be 2-D"):
        search(x[0], x, 1)
    with pytest.raises(ValueError, match="give both query_keys and doc_keys"):
        search(x, x, 1, query_keys=[0, 1, 2, 3])
    with pytest.raises(ValueError, match="index kind must be"):
        search(x, x, 1, IndexOptions("lsh"))
    with pytest.raises(ValueError, match="1 query labels for 4 query embeddings"):
        evaluate(x, x, ["a"], ["a"] * 4)

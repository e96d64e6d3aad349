"""personvlad.eval.evaluate / compute_distmat: hand-checked cases, brute-force
parity (both protocols), ties, junk ids, validation, speed."""
import time

import numpy as np
import pytest
import torch

from personvlad.eval import compute_distmat, evaluate, per_query_stats
from personvlad.eval.protocols import stable_argsort_rows


# ---------------------------------------------------------------------------
# brute-force per-query loops written directly from the protocol definitions
# ---------------------------------------------------------------------------
def brute_standard(d, qp, gp, qc, gc, max_rank):
    cmcs, aps = [], []
    for k in range(d.shape[0]):
        order = sorted(range(d.shape[1]), key=lambda j: (d[k, j], j))
        kept = [j for j in order if not (gp[j] == qp[k] and gc[j] == qc[k])]
        m = [gp[j] == qp[k] for j in kept]
        if not any(m):
            continue
        first = m.index(True)
        cmcs.append([1.0 if r >= first else 0.0 for r in range(max_rank)])
        hits, s = 0, 0.0
        for r, x in enumerate(m):
            if x:
                hits += 1
                s += hits / (r + 1)
        aps.append(s / sum(m))
    if not cmcs:
        return None
    return np.mean(cmcs, 0), float(np.mean(aps))


def brute_mars(d, qp, gp, qc, gc, max_rank):
    """Line-by-line port of the MARS kit (evaluation.m + compute_AP.m)."""
    cmcs, aps = [], []
    for k in range(d.shape[0]):
        index = sorted(range(d.shape[1]), key=lambda j: (d[k, j], j))  # MATLAB sort is stable
        good = {j for j in range(d.shape[1]) if gp[j] == qp[k] and gc[j] != qc[k]}
        junk = {j for j in range(d.shape[1]) if gp[j] == -1 or (gp[j] == qp[k] and gc[j] == qc[k])}
        cmc = np.zeros(len(index))
        ngood = len(good)
        old_recall, old_precision, ap, inter, j, good_now, njunk = 0.0, 1.0, 0.0, 0, 0, 0, 0
        for n, idx in enumerate(index):
            flag = False
            if idx in good:
                cmc[n - njunk:] = 1
                flag = True
                good_now += 1
            if idx in junk:
                njunk += 1
                continue
            if flag:
                inter += 1
            if ngood == 0:  # MATLAB: 0/0 = NaN -> ap NaN -> set to 0 afterwards
                ap = float("nan")
                break
            recall = inter / ngood
            precision = inter / (j + 1)
            ap += (recall - old_recall) * ((old_precision + precision) / 2)
            old_recall, old_precision = recall, precision
            j += 1
            if good_now == ngood:
                break
        if np.isnan(ap):
            ap = 0.0
        c = np.full(max_rank, cmc[-1])
        c[:min(max_rank, len(cmc))] = cmc[:max_rank]
        cmcs.append(c)
        aps.append(ap)
    return np.mean(cmcs, 0), float(np.mean(aps))


# ---------------------------------------------------------------------------
# hand-checked cases
# ---------------------------------------------------------------------------
def _hand_case():
    # gallery:  g0 pid1 cam0 | g1 pid2 cam1 | g2 pid1 cam1 | g3 pid3 cam0 | g4 pid1 cam2
    gp = np.array([1, 2, 1, 3, 1])
    gc = np.array([0, 1, 1, 0, 2])
    qp = np.array([1, 2, 3])
    qc = np.array([0, 1, 1])
    d = np.array([
        [0.1, 0.2, 0.3, 0.4, 0.5],   # q0: g0 removed/junk, then g1 x, g2 hit, g3 x, g4 hit
        [0.5, 0.1, 0.2, 0.3, 0.4],   # q1: its only same-id entry (g1) is same-camera -> no valid match
        [0.9, 0.8, 0.7, 0.0, 0.6],   # q2: g3 first, a hit
    ], dtype=np.float32)
    return d, qp, gp, qc, gc


def test_standard_hand_checked():
    d, qp, gp, qc, gc = _hand_case()
    cmc, mAP = evaluate(d, qp, gp, qc, gc, max_rank=4, protocol="standard")
    # q0: kept order g1,g2,g3,g4 -> hits at ranks 2,4 -> AP = (1/2 + 2/4)/2 = 0.5
    # q1: skipped; q2: hit at rank 1 -> AP = 1
    assert np.allclose(cmc, [0.5, 1.0, 1.0, 1.0])
    assert mAP == pytest.approx((0.5 + 1.0) / 2)


def test_mars_hand_checked():
    d, qp, gp, qc, gc = _hand_case()
    cmc, mAP = evaluate(d, qp, gp, qc, gc, max_rank=4, protocol="mars")
    # q0: non-junk list g1(j=1) g2(j=2, hit 1) g3(j=3) g4(j=4, hit 2), ngood = 2
    #   hit 1: old precision (at j=1) = 0/1, precision 1/2 -> (0 + 1/2)/2 * 1/2 = 1/8
    #   hit 2: old precision (at j=3) = 1/3, precision 2/4 -> (1/3 + 1/2)/2 * 1/2 = 5/24
    ap0 = 1 / 8 + 5 / 24
    # q1: no good entry -> AP 0 and CMC 0, still counted; q2: (1 + 1)/2 * 1 = 1
    assert mAP == pytest.approx((ap0 + 0.0 + 1.0) / 3)
    assert np.allclose(cmc, [1 / 3, 2 / 3, 2 / 3, 2 / 3])


def test_junk_ids_minus_one():
    # g0 is a -1 junk entry ranked first
    gp = np.array([-1, 5, 7, 5])
    gc = np.array([1, 1, 1, 2])
    d = np.array([[0.0, 0.1, 0.2, 0.3]], dtype=np.float32)
    qp, qc = np.array([5]), np.array([0])
    cmc, mAP = evaluate(d, qp, gp, qc, gc, max_rank=3, protocol="standard")
    # standard: -1 is an ordinary non-matching entry: hits at ranks 2 and 4
    assert np.allclose(cmc, [0, 1, 1]) and mAP == pytest.approx((1 / 2 + 2 / 4) / 2)
    cmc, mAP = evaluate(d, qp, gp, qc, gc, max_rank=3, protocol="mars")
    # mars: g0 junk; g1 j=1 hit1: (1 + 1)/2 * 1/2 = 1/2 (old precision starts at 1);
    # g2 j=2; g3 j=3 hit2: old precision 1/2, precision 2/3 -> (1/2 + 2/3)/2 * 1/2 = 7/24
    assert np.allclose(cmc, [1, 1, 1]) and mAP == pytest.approx(1 / 2 + 7 / 24)


def test_ties_are_broken_by_gallery_index():
    qp, qc = np.array([1]), np.array([0])
    d = np.full((1, 3), 0.5, dtype=np.float32)
    gp = np.array([2, 1, 1])
    gc = np.array([1, 1, 1])
    cmc, mAP = evaluate(d, qp, gp, qc, gc, max_rank=3)
    assert np.allclose(cmc, [0, 1, 1]) and mAP == pytest.approx((1 / 2 + 2 / 3) / 2)
    cmc, mAP = evaluate(d, qp, gp, qc, gc, max_rank=3, protocol="mars")
    assert mAP == pytest.approx(1 / 8 + 7 / 24)
    # the same gallery in another order: the tie now favours the matches
    cmc, mAP = evaluate(d, qp, gp[::-1].copy(), qc, gc, max_rank=3)
    assert np.allclose(cmc, [1, 1, 1]) and mAP == pytest.approx(1.0)
    # float64 input (the plain stable argsort path) gives the same
    cmc64, mAP64 = evaluate(d.astype(np.float64), qp, gp, qc, gc, max_rank=3)
    assert np.allclose(cmc64, [0, 1, 1]) and mAP64 == pytest.approx((1 / 2 + 2 / 3) / 2)


def test_mars_query_with_junk_id_minus_one():
    # MATLAB edge case: a query with id -1: its good entries are also junk -> they set the CMC but are no hit
    gp = np.array([3, -1, -1])
    gc = np.array([1, 1, 0])
    d = np.array([[0.1, 0.2, 0.3]], dtype=np.float32)
    cmc, mAP = evaluate(d, np.array([-1]), gp, np.array([0]), gc, max_rank=3, protocol="mars")
    exp_cmc, exp_map = brute_mars(d, np.array([-1]), gp, np.array([0]), gc, 3)
    assert np.allclose(cmc, exp_cmc) and mAP == pytest.approx(exp_map)
    assert np.allclose(cmc, [0, 1, 1]) and mAP == 0.0


def test_standard_raises_when_no_query_has_a_match():
    d = np.zeros((2, 2), dtype=np.float32)
    with pytest.raises(ValueError, match="no query has a match"):
        evaluate(d, [1, 2], [1, 2], [0, 0], [0, 0], protocol="standard")
    # the MARS protocol counts them as 0 instead
    cmc, mAP = evaluate(d, [1, 2], [1, 2], [0, 0], [0, 0], max_rank=2, protocol="mars")
    assert mAP == 0.0 and np.allclose(cmc, 0.0)


def test_max_rank_longer_than_gallery_stays_flat():
    d = np.array([[0.2, 0.1]], dtype=np.float32)
    cmc, _ = evaluate(d, [1], [1, 2], [0], [1, 1], max_rank=5)
    assert cmc.shape == (5,) and np.allclose(cmc, [0, 1, 1, 1, 1])


# ---------------------------------------------------------------------------
# brute-force parity on random data
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("protocol", ["standard", "mars"])
@pytest.mark.parametrize("seed", range(6))
def test_vectorised_matches_brute_force(protocol, seed):
    rng = np.random.default_rng(seed)
    nq, ng = int(rng.integers(5, 25)), int(rng.integers(5, 50))
    if seed % 2:  # coarse values -> many ties, also negative values
        d = (rng.integers(-3, 4, (nq, ng)) * 0.5).astype(np.float32)
    else:
        d = rng.standard_normal((nq, ng)).astype(np.float64 if seed == 2 else np.float32)
    qp, gp = rng.integers(-1, 6, nq), rng.integers(-1, 6, ng)
    qc, gc = rng.integers(0, 3, nq), rng.integers(0, 3, ng)
    ref = (brute_standard if protocol == "standard" else brute_mars)(d, qp, gp, qc, gc, 10)
    if ref is None:
        with pytest.raises(ValueError):
            evaluate(d, qp, gp, qc, gc, max_rank=10, protocol=protocol)
        return
    cmc, mAP = evaluate(d, qp, gp, qc, gc, max_rank=10, protocol=protocol)
    assert np.allclose(cmc, ref[0]) and mAP == pytest.approx(ref[1], abs=1e-12)


@pytest.mark.parametrize("protocol", ["standard", "mars"])
def test_chunking_and_threads_do_not_change_results(protocol):
    rng = np.random.default_rng(7)
    d = rng.random((37, 61)).astype(np.float32)
    qp, gp = rng.integers(0, 8, 37), rng.integers(-1, 8, 61)
    qc, gc = rng.integers(0, 2, 37), rng.integers(0, 2, 61)
    a = per_query_stats(d, qp, gp, qc, gc, protocol, chunk_elements=1 << 20, workers=1)
    b = per_query_stats(d, qp, gp, qc, gc, protocol, chunk_elements=61 * 4, workers=3)
    for k in a:
        assert np.array_equal(np.nan_to_num(a[k], nan=-7), np.nan_to_num(b[k], nan=-7)), k


def test_torch_inputs_accepted():
    d, qp, gp, qc, gc = _hand_case()
    cmc, mAP = evaluate(torch.from_numpy(d), torch.from_numpy(qp), torch.from_numpy(gp),
                        torch.from_numpy(qc), torch.from_numpy(gc), max_rank=4)
    assert mAP == pytest.approx(0.75)


def test_bfloat16_torch_distances_are_evaluated_like_their_float32_values():
    # numpy has no bfloat16: the tensor is widened (exactly), not refused with
    # a TypeError; values that tie in bfloat16 tie in the widened copy too
    rng = np.random.default_rng(3)
    d = torch.from_numpy(rng.random((6, 12)).astype(np.float32)).to(torch.bfloat16)
    qp, gp = np.arange(6) % 4, np.arange(12) % 4
    qc, gc = np.zeros(6, dtype=int), np.ones(12, dtype=int)
    got = evaluate(d, qp, gp, qc, gc, max_rank=5)
    want = evaluate(d.float().numpy(), qp, gp, qc, gc, max_rank=5)
    assert np.array_equal(got[0], want[0]) and got[1] == want[1]


def test_nan_anywhere_in_distmat_is_refused():
    d, qp, gp, qc, gc = _hand_case()
    d = d.astype(np.float64).copy()
    d[-1, -1] = np.nan
    with pytest.raises(ValueError, match="distmat: contains NaN"):
        evaluate(d, qp, gp, qc, gc, max_rank=4)


def test_stable_argsort_rows_equals_numpy_stable():
    rng = np.random.default_rng(0)
    d = rng.standard_normal((40, 300)).astype(np.float32)
    d[d > 1] = 1.0
    d[d < -1] = -1.0
    d[:, ::7] = -0.0
    d[:, ::11] = 0.0
    d[0, 3], d[1, 5], d[2, 7] = np.inf, -np.inf, np.inf
    assert np.array_equal(stable_argsort_rows(d), np.argsort(d, axis=1, kind="stable"))
    h = d.astype(np.float16)
    assert np.array_equal(stable_argsort_rows(h), np.argsort(h, axis=1, kind="stable"))
    i = rng.integers(0, 5, (4, 50))
    assert np.array_equal(stable_argsort_rows(i), np.argsort(i, axis=1, kind="stable"))


def test_large_case_is_fast():
    rng = np.random.default_rng(1)
    nq, ng = 2000, 3000
    d = rng.random((nq, ng), dtype=np.float32)
    qp, gp = rng.integers(0, 300, nq), rng.integers(-1, 300, ng)
    qc, gc = rng.integers(0, 6, nq), rng.integers(0, 6, ng)
    t = time.perf_counter()
    for protocol in ("standard", "mars"):
        cmc, mAP = evaluate(d, qp, gp, qc, gc, max_rank=50, protocol=protocol)
        assert cmc.shape == (50,) and 0.0 <= mAP <= 1.0 and np.all(np.diff(cmc) >= 0)
    assert time.perf_counter() - t < 20.0  # ~1 s on 2 idle cores; generous for a busy CI box


# ---------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,name", [
    (dict(distmat=np.zeros(3)), "distmat"),
    (dict(distmat=np.zeros((0, 3))), "distmat"),
    (dict(distmat=np.array([[np.nan, 0, 0], [0, 0, 0]])), "distmat"),
    (dict(q_pids=[1, 2, 3]), "q_pids"),
    (dict(g_pids=[1, 2]), "g_pids"),
    (dict(q_camids=[[0, 0]]), "q_camids"),
    (dict(g_camids=[0, 0, 0, 0]), "g_camids"),
    (dict(g_pids=["a", "b", "c"]), "g_pids"),
    (dict(max_rank=0), "max_rank"),
    (dict(protocol="market"), "protocol"),
])
def test_validation_names_the_argument(kwargs, name):
    args = dict(distmat=np.zeros((2, 3)), q_pids=[1, 2], g_pids=[1, 2, 3], q_camids=[0, 0], g_camids=[1, 1, 1])
    args.update(kwargs)
    with pytest.raises(ValueError, match=name):
        evaluate(**args)


# ---------------------------------------------------------------------------
# compute_distmat
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("metric", ["euclidean", "sqeuclidean", "cosine"])
def test_compute_distmat_matches_numpy(metric):
    rng = np.random.default_rng(0)
    q, g = rng.standard_normal((7, 5)), rng.standard_normal((9, 5))
    diff = q[:, None, :] - g[None, :, :]
    if metric == "euclidean":
        ref = np.sqrt((diff ** 2).sum(-1))
    elif metric == "sqeuclidean":
        ref = (diff ** 2).sum(-1)
    else:
        qn = q / np.linalg.norm(q, axis=1, keepdims=True)
        gn = g / np.linalg.norm(g, axis=1, keepdims=True)
        ref = 1 - qn @ gn.T
    out = compute_distmat(q.astype(np.float32), g.astype(np.float32), metric=metric, chunk=3, device="cpu")
    assert out.shape == (7, 9) and out.dtype == np.float32
    assert np.allclose(out, ref, atol=1e-5)
    out64 = compute_distmat(torch.from_numpy(q), g, metric=metric, chunk=2, device="cpu")
    assert out64.dtype == np.float64 and np.allclose(out64, ref, atol=1e-10)


def test_compute_distmat_validation():
    with pytest.raises(ValueError, match="metric"):
        compute_distmat(np.zeros((2, 3)), np.zeros((2, 3)), metric="manhattan")
    with pytest.raises(ValueError, match="gf"):
        compute_distmat(np.zeros((2, 3)), np.zeros((2, 4)))
    with pytest.raises(ValueError, match="qf"):
        compute_distmat(np.zeros(3), np.zeros((2, 3)))
    with pytest.raises(ValueError, match="chunk"):
        compute_distmat(np.zeros((2, 3)), np.zeros((2, 3)), chunk=0)
    with pytest.raises(ValueError, match="device: expected a torch device"):
        compute_distmat(np.zeros((2, 3)), np.zeros((2, 3)), device="gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device: 'cuda' requested but CUDA is not available"):
            compute_distmat(np.zeros((2, 3)), np.zeros((2, 3)), device="cuda")


@pytest.mark.cuda
def test_compute_distmat_cuda_matches_cpu():
    rng = np.random.default_rng(0)
    q, g = rng.standard_normal((50, 64)).astype(np.float32), rng.standard_normal((70, 64)).astype(np.float32)
    assert np.allclose(compute_distmat(q, g, device="cuda"), compute_distmat(q, g, device="cpu"), atol=1e-4)


def test_single_cross_camera_match_gives_same_cmc_and_lower_trapezoid_ap():
    # iLIDS-VID / PRID-2011 layout: query cam 0, gallery cam 1, one tracklet per id, no junk
    rng = np.random.default_rng(4)
    n = 40
    d = rng.random((n, n)).astype(np.float32)
    ids, q_cam, g_cam = np.arange(n), np.zeros(n, int), np.ones(n, int)
    cmc_s, map_s = evaluate(d, ids, ids, q_cam, g_cam, max_rank=20, protocol="standard")
    cmc_m, map_m = evaluate(d, ids, ids, q_cam, g_cam, max_rank=20, protocol="mars")
    assert np.array_equal(cmc_s, cmc_m)
    st = per_query_stats(d, ids, ids, q_cam, g_cam, "standard")
    mt = per_query_stats(d, ids, ids, q_cam, g_cam, "mars")
    r = st["first_rank"] + 1  # 1-based rank of the only match
    assert np.allclose(st["ap"], 1.0 / r)
    assert np.allclose(mt["ap"], np.where(r == 1, 1.0, 0.5 / r))  # ((0/(r-1)) + 1/r) / 2
    assert map_m <= map_s

"""OIM loss (SPEC §4) and the comparison losses."""
import math
import os

import pytest
import torch
import torch.nn.functional as F

from personvlad.losses import BatchHardTripletLoss, OIMLoss, SoftmaxCELoss, build_loss


def _unit(t):
    return t / t.norm(dim=1, keepdim=True)


def _set_buffers(loss, lut, queue=None, filled=0, ptr=0):
    with torch.no_grad():
        loss.lut.copy_(lut)
        if queue is not None:
            loss.queue.copy_(queue)
        loss.queue_filled.fill_(filled)
        loss.queue_ptr.fill_(ptr)


def test_oim_matches_hand_formula():
    torch.manual_seed(0)
    D, L, Q, T = 5, 4, 3, 0.1
    loss = OIMLoss(D, L, queue_size=Q, temperature=T)
    lut = _unit(torch.randn(L, D))
    queue = _unit(torch.randn(Q, D))
    _set_buffers(loss, lut, queue, filled=Q)
    feats = torch.randn(3, D, dtype=torch.float64) * 3
    labels = torch.tensor([2, -1, 0])
    got = loss(feats, labels)
    # expected: mean over labeled samples of -log softmax(x·[lut;queue]/T)[y]
    total = 0.0
    for i in (0, 2):
        x = feats[i].tolist()
        n = math.sqrt(sum(v * v for v in x))
        x = [v / n for v in x]
        rows = lut.tolist() + queue.tolist()
        logits = [sum(a * b for a, b in zip(x, r)) / T for r in rows]
        m = max(logits)
        lse = m + math.log(sum(math.exp(v - m) for v in logits))
        total += lse - logits[int(labels[i])]
    assert got.dtype == torch.float32
    assert abs(float(got) - total / 2) < 1e-4


def test_oim_unwritten_queue_slots_count_as_zeros():
    # SPEC §4: logits against [LUT; queue], every slot of it; a fresh loss
    # has an all-zero LUT and queue, so each logit is 0: loss = log(L + Q).
    loss = OIMLoss(4, 3)
    assert float(loss(torch.randn(2, 4), torch.tensor([0, 1]))) == pytest.approx(math.log(3 + 5000), rel=1e-6)
    torch.manual_seed(1)
    loss = OIMLoss(4, 3, queue_size=5)
    lut = _unit(torch.randn(3, 4))
    q = _unit(torch.randn(5, 4))
    q[2:] = 0  # what a queue with 2 slots written holds
    _set_buffers(loss, lut, q, filled=2)
    loss.eval()  # no update
    x = torch.randn(2, 4)
    y = torch.tensor([0, 1])
    exp = F.cross_entropy(_unit(x) @ torch.cat([lut, q]).t() / 0.1, y)
    assert torch.allclose(loss(x, y), exp, atol=1e-6)
    assert torch.equal(loss.table(), torch.cat([lut, q]))


def test_oim_skip_unwritten_leaves_unwritten_slots_out():
    torch.manual_seed(1)
    loss = OIMLoss(4, 3, queue_size=5, skip_unwritten=True)
    assert "skip_unwritten=True" in repr(loss)
    lut = _unit(torch.randn(3, 4))
    q = _unit(torch.randn(5, 4))
    _set_buffers(loss, lut, q, filled=2)
    loss.eval()  # no update
    x = torch.randn(2, 4)
    y = torch.tensor([0, 1])
    exp = F.cross_entropy(_unit(x) @ torch.cat([lut, q[:2]]).t() / 0.1, y)
    assert torch.allclose(loss(x, y), exp, atol=1e-6)
    assert torch.equal(loss.table(), torch.cat([lut, q[:2]]))
    # sampled negatives come from the written entries only: with S = L - 1 + 2
    # every written entry is drawn, so the loss is the full one
    sampled = OIMLoss(4, 3, queue_size=5, num_sampled=4, skip_unwritten=True).eval()
    _set_buffers(sampled, lut, q, filled=2)
    assert torch.allclose(sampled(x, y), exp, atol=1e-6)
    with pytest.raises(ValueError, match="skip_unwritten"):
        OIMLoss(4, 3, skip_unwritten=1)


def test_oim_pickled_before_skip_unwritten_keeps_leaving_slots_out():
    """An OIMLoss pickled before the option existed has no such attribute;
    it goes on as it was trained (unwritten slots left out)."""
    import pickle

    old = OIMLoss(4, 3, queue_size=5)
    del old.__dict__["skip_unwritten"]  # what such a pickle restores
    loaded = pickle.loads(pickle.dumps(old))
    assert loaded.skip_unwritten is True
    assert float(loaded.eval()(torch.randn(2, 4), torch.tensor([0, 1]))) == pytest.approx(math.log(3), rel=1e-6)


def test_oim_gradient_flows_and_buffers_do_not_require_grad():
    loss = OIMLoss(6, 3, queue_size=4)
    _set_buffers(loss, _unit(torch.randn(3, 6)))  # an all-zero LUT would give zero logits
    x = torch.randn(4, 6, requires_grad=True)
    out = loss(x, torch.tensor([0, 1, -1, 2]))
    out.backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert not loss.lut.requires_grad


def test_oim_no_labeled_sample_gives_connected_zero():
    loss = OIMLoss(4, 3, queue_size=4)
    x = torch.randn(3, 4, requires_grad=True)
    out = loss(x, torch.tensor([-1, -1, -1]))
    assert float(out.detach()) == 0.0 and out.requires_grad
    out.backward()
    assert x.grad is not None and torch.all(x.grad == 0)
    assert int(loss.queue_filled) == 3 and int(loss.queue_ptr) == 3


def test_oim_lut_update_sequential_with_duplicates():
    torch.manual_seed(2)
    D, L, m = 4, 3, 0.5
    loss = OIMLoss(D, L, queue_size=0, momentum=m)
    lut = _unit(torch.randn(L, D))
    _set_buffers(loss, lut)
    x = torch.randn(5, D)
    y = torch.tensor([1, 2, 1, -1, 1])
    loss(x, y)
    exp = lut.clone()
    for xi, yi in zip(_unit(x), y.tolist()):  # sequential, in batch order
        if yi >= 0:
            exp[yi] = F.normalize(m * exp[yi] + (1 - m) * xi, dim=0)
    assert torch.allclose(loss.lut, exp, atol=1e-6)
    assert torch.allclose(loss.lut[0], lut[0])  # untouched row


def test_oim_queue_update_wraps_around():
    D, Q = 3, 4
    loss = OIMLoss(D, 2, queue_size=Q)
    feats = [_unit(torch.randn(1, D))[0] for _ in range(7)]
    loss(torch.stack(feats[:3]), torch.tensor([-1, -1, -1]))
    assert int(loss.queue_ptr) == 3 and int(loss.queue_filled) == 3
    loss(torch.stack(feats[3:6] + [torch.randn(D)]), torch.tensor([-1, -1, -1, 0]))
    # slot 3 <- f3, then wrap: slot 0 <- f4, slot 1 <- f5
    assert int(loss.queue_ptr) == 2 and int(loss.queue_filled) == 4
    exp = torch.stack([feats[4], feats[5], feats[2], feats[3]])
    assert torch.allclose(loss.queue, exp, atol=1e-6)


def test_oim_queue_more_unlabeled_than_slots_keeps_last():
    D, Q = 3, 3
    loss = OIMLoss(D, 2, queue_size=Q)
    loss(torch.randn(1, D), torch.tensor([-1]))  # ptr 1
    f = _unit(torch.randn(5, D))
    loss(f, torch.full((5,), -1))
    # sequential writes at 1,2,0,1,2: final slots 0<-f2, 1<-f3, 2<-f4
    assert torch.allclose(loss.queue, f[[2, 3, 4]], atol=1e-6)
    assert int(loss.queue_ptr) == (1 + 5) % Q and int(loss.queue_filled) == Q


def test_oim_sampled_partition_keeps_target():
    torch.manual_seed(3)
    D, L, S = 8, 50, 5
    loss = OIMLoss(D, L, queue_size=0, num_sampled=S).eval()
    lut = _unit(torch.randn(L, D))
    _set_buffers(loss, lut)
    x = lut[[7, 9]] * 4  # each sample equals its target row
    y = torch.tensor([7, 9])
    # record the sampled columns by monkeypatching topk's input: recompute with the same seed
    torch.manual_seed(10)
    got = loss(x, y)
    torch.manual_seed(10)
    scores = torch.rand(2, L)
    scores.scatter_(1, y[:, None], -1.0)
    neg = scores.topk(S, 1).indices
    assert not (neg == y[:, None]).any()  # target is never drawn as a negative
    assert all(len(set(r)) == S for r in neg.tolist())  # without replacement
    logits = _unit(x) @ lut.t() / 0.1
    sub = torch.cat([logits.gather(1, y[:, None]), logits.gather(1, neg)], 1)
    exp = F.cross_entropy(sub, torch.zeros(2, dtype=torch.long))
    assert torch.allclose(got, exp, atol=1e-5)
    # only S+1 terms: the sampled loss is below the full one
    full = F.cross_entropy(logits, y)
    assert float(got) <= float(full) + 1e-6
    # S >= all negatives -> exact full loss
    big = OIMLoss(D, L, queue_size=0, num_sampled=L).eval()
    _set_buffers(big, lut)
    assert torch.allclose(big(x, y), full, atol=1e-5)


def test_oim_state_dict_roundtrip():
    a = OIMLoss(4, 3, queue_size=5)
    a(torch.randn(6, 4), torch.tensor([0, -1, 1, -1, 2, -1]))
    sd = a.state_dict()
    assert set(sd) >= {"lut", "queue", "queue_ptr", "queue_filled"}
    b = OIMLoss(4, 3, queue_size=5)
    b.load_state_dict(sd)
    for k in sd:
        assert torch.equal(sd[k], b.state_dict()[k])
    with pytest.raises(ValueError, match="lut"):
        OIMLoss(4, 7, queue_size=5).load_state_dict(sd)


@pytest.mark.parametrize("kwargs, name", [
    (dict(num_features=0, num_labeled=3), "num_features"),
    (dict(num_features=4, num_labeled=0), "num_labeled"),
    (dict(num_features=4, num_labeled=3, queue_size=-1), "queue_size"),
    (dict(num_features=4, num_labeled=3, temperature=0.0), "temperature"),
    (dict(num_features=4, num_labeled=3, momentum=1.5), "momentum"),
    (dict(num_features=4, num_labeled=3, num_sampled=0), "num_sampled"),
])
def test_oim_constructor_validation(kwargs, name):
    with pytest.raises(ValueError, match=name):
        OIMLoss(**kwargs)


def test_oim_accepts_numpy_integers_and_reals():
    import numpy as np

    loss = OIMLoss(np.int64(4), np.int32(3), queue_size=np.int64(2), temperature=np.float32(0.5),
                   momentum=np.float64(0.25), num_sampled=np.int16(1))
    assert (loss.num_features, loss.num_labeled, loss.queue_size, loss.num_sampled) == (4, 3, 2, 1)
    assert all(type(v) is int for v in (loss.num_features, loss.num_labeled, loss.queue_size, loss.num_sampled))
    assert loss.lut.shape == (3, 4) and loss.queue.shape == (2, 4)
    with pytest.raises(ValueError, match="num_labeled"):
        OIMLoss(4, np.float64(3.0))


def test_oim_two_losses_summed_before_one_backward():
    # The second forward writes to the queue (and the LUT) in place; the first
    # loss's graph must keep what it read, whether or not its own step wrote
    # to the queue.  Gradients equal those of two separate backwards.
    torch.manual_seed(0)

    def run(together):
        loss = OIMLoss(8, 5, queue_size=4)
        loss(torch.randn(3, 8), torch.tensor([-1, -1, 0]))  # queue partly filled
        x1 = torch.randn(2, 8, requires_grad=True)
        x2 = torch.randn(2, 8, requires_grad=True)
        l1 = loss(x1, torch.tensor([0, 1]))  # labeled only: writes no queue slot
        if not together:
            l1.backward()
        l2 = loss(x2, torch.tensor([2, -1]))  # writes a queue slot and LUT row 2
        (l1 + l2).backward() if together else l2.backward()
        return x1.grad, x2.grad

    torch.manual_seed(1)
    g_together = run(True)
    torch.manual_seed(1)
    g_apart = run(False)
    for a, b in zip(g_together, g_apart):
        assert a is not None and torch.equal(a, b)


@pytest.mark.parametrize("dtype, compute", [(torch.float64, torch.float64), (torch.bfloat16, torch.float32)])
def test_oim_module_cast_to_another_dtype(dtype, compute):
    torch.manual_seed(0)
    loss = OIMLoss(6, 4, queue_size=3).to(dtype)
    feats = torch.randn(5, 6, dtype=dtype, requires_grad=True)
    labels = torch.tensor([0, -1, 3, 1, -1])
    out = loss(feats, labels)
    assert out.dtype == compute and torch.isfinite(out)
    out.backward()
    assert feats.grad.dtype == dtype and torch.isfinite(feats.grad).all()
    assert loss.lut.dtype == dtype and loss.queue.dtype == dtype  # updated in their own dtype
    assert int(loss.queue_filled) == 2 and loss.lut[3].float().norm() > 0
    if dtype == torch.float64:  # the float64 module is differentiable to float64 accuracy
        probe = OIMLoss(6, 4, queue_size=3).double().eval()
        probe.load_state_dict(loss.state_dict())
        x = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(lambda t: probe(t, labels), (x,))


def test_oim_forward_validation():
    loss = OIMLoss(4, 3)
    with pytest.raises(ValueError, match="features"):
        loss(torch.randn(2, 5), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="features"):
        loss(torch.randint(0, 3, (2, 4)), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="labels"):
        loss(torch.randn(2, 4), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="labels"):
        loss(torch.randn(2, 4), torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="labels"):
        loss(torch.randn(2, 4), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="labels"):
        loss(torch.randn(2, 4), torch.tensor([0, -2]))


def test_softmax_and_triplet():
    torch.manual_seed(0)
    ce = SoftmaxCELoss(4, 3)
    x = torch.randn(4, 4, requires_grad=True)
    y = torch.tensor([0, 1, -1, 2])
    exp = F.cross_entropy(ce.classifier(x[[0, 1, 3]]), y[[0, 1, 3]])
    assert torch.allclose(ce(x, y), exp)
    with pytest.raises(ValueError, match="labels"):
        ce(x, torch.tensor([0, 1, 2, 3]))
    tri = BatchHardTripletLoss(margin=0.5)
    f = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0], [0.0, 3.0]], requires_grad=True)
    lab = torch.tensor([0, 0, 1, 1])
    # anchor0: d_ap=1, d_an=2 -> 0 ; anchor1: d_ap=1, d_an=sqrt(5) -> 0
    # anchor2: d_ap=1, d_an=2 -> 0 ; anchor3: d_ap=1, d_an=3 -> 0; with margin 1.5: 0.5,0,0.5,0
    assert float(tri(f, lab).detach()) == 0.0
    tri2 = BatchHardTripletLoss(margin=1.5)
    v = tri2(f, lab)
    assert abs(float(v.detach()) - (0.5 + (1 + 1.5 - math.sqrt(5)) + 0.5 + 0) / 4) < 1e-5
    v.backward()
    assert f.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="margin"):
        BatchHardTripletLoss(margin=-1)
    assert float(tri(f, torch.tensor([0, 1, 2, 3])).detach()) == 0.0  # no positives: connected zero
    assert isinstance(build_loss("oim", 4, 3, queue_size=2, margin=1), OIMLoss)
    with pytest.raises(ValueError, match="name"):
        build_loss("arcface", 4, 3)


# ----------------------------------------------------------------- distributed
def _dist_worker(rank, world, init_file, result_dir):
    import torch.distributed as dist

    from personvlad.engine.distributed import drain_gloo

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    finished = False
    try:
        torch.manual_seed(100 + rank)  # each rank sees different data
        loss = OIMLoss(4, 6, queue_size=5, num_sampled=3)
        for step in range(3):
            x = torch.randn(4, 4, requires_grad=True)
            y = torch.tensor([rank, rank + 2, -1, (rank * 3) % 6])
            if step == 2 and rank == 1:  # uneven last batch (DistributedSampler without drop_last)
                x, y = x[:2].detach().requires_grad_(True), torch.tensor([1, -1])
            loss(x, y).backward()
        torch.save({k: v.clone() for k, v in loss.state_dict().items()},
                   os.path.join(result_dir, f"rank{rank}.pt"))
        finished = True
    finally:
        if finished:  # else a clean exit does not matter, and a dead peer would hang the drain
            drain_gloo()  # torch's gloo exit abort: see drain_gloo
        dist.destroy_process_group()


def test_oim_buffers_identical_across_gloo_ranks(tmp_path):
    import torch.multiprocessing as mp

    init_file = tmp_path / "init"
    mp.spawn(_dist_worker, args=(2, str(init_file), str(tmp_path)), nprocs=2, join=True)
    s0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    s1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    for k in s0:
        assert torch.equal(s0[k], s1[k]), k
    # both ranks' features reached the table: 3 steps x 2 ranks x 1 unlabeled = 6 > 5 slots
    # (the last step's batches were 4 and 2 samples: no padding row got in)
    assert int(s0["queue_filled"]) == 5 and int(s0["queue_ptr"]) == 1
    assert (s0["queue"].norm(dim=1) - 1).abs().max() < 1e-5  # every slot a normalised feature
    # rank 0 uses ids {0, 2}, rank 1 ids {1, 3}: both ranks' rows were written on each rank
    written = (s0["lut"].norm(dim=1) > 0.5).nonzero().flatten().tolist()
    assert written == [0, 1, 2, 3]


def test_oim_host_labels_give_the_same_result_as_device_labels():
    """Labels on the host (what the trainer passes: no device sync) or on the
    features' device: the same loss, gradient and buffer updates, bitwise."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(3)
    x = torch.randn(7, 6, device=dev)
    y = torch.tensor([1, -1, 1, 0, -1, 3, 1])
    outs = []
    for labels in (y, y.to(dev)):
        loss = OIMLoss(6, 4, queue_size=3).to(dev)
        _set_buffers(loss, _unit(torch.randn(4, 6, generator=torch.Generator().manual_seed(0))).to(dev))
        xi = x.clone().requires_grad_(True)
        for _ in range(2):  # the second call sees the updated LUT and queue
            v = loss(xi, labels)
            v.backward()
        outs.append((v.detach(), xi.grad, loss.lut.clone(), loss.queue.clone(), int(loss.queue_ptr),
                     int(loss.queue_filled)))
    for a, b in zip(*outs):
        assert torch.equal(torch.as_tensor(a), torch.as_tensor(b))
    assert outs[0][4:] == (1, 3)  # 4 unlabeled written in a queue of 3: ptr (0 + 4) % 3, filled 3


@pytest.mark.cuda
def test_oim_forward_backward_update_make_no_device_sync():
    loss = OIMLoss(16, 10, queue_size=8, num_sampled=4).cuda()
    x = torch.randn(6, 16, device="cuda", requires_grad=True)
    y = torch.tensor([0, 1, 1, -1, 2, -1]).pin_memory()
    for _ in range(2):
        loss(x, y).backward()  # warm-up: allocations, pinned blocks
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            loss(x, y).backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert int(loss.queue_filled) == 8

"""Frame decoding with bad-frame tolerance, clip sampling, the JPEG loaders and the shard fast path."""
import logging
import os
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from personvlad.data import (FrameStats, IdentityBalancedSampler, TestClipDataset, TrainClipDataset,
                             build_test_loader, build_train_loader, read_clip, test_clip_indices,
                             train_clip_indices)
from personvlad.data.sampling import random_test_clip
from personvlad.data.shards import ShardStore, ShardTestLoader, ShardTrainLoader, pack_dataset

SIZE = (16, 8)


def _frame(value, h=32, w=16):
    """A frame whose left half is ``value`` and right half 255 - value (flip-detectable)."""
    a = np.zeros((h, w, 3), np.uint8)
    a[:, : w // 2] = value
    a[:, w // 2:] = 255 - value
    a[: h // 4] = (value * 7) % 256  # vertical structure too
    return a


def _tracklet(d, n, base=0, ext="png"):
    os.makedirs(d, exist_ok=True)
    paths = []
    for f in range(n):
        p = os.path.join(d, f"{f:03d}.{ext}")
        Image.fromarray(_frame(base + 10 * f)).save(p)
        paths.append(p)
    return tuple(paths)


class _DS:
    def __init__(self, train, query, gallery):
        self.train, self.query, self.gallery = train, query, gallery
        self.name, self.num_train_pids = "toy", len({t[1] for t in train})


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """6 ids x 2 cameras x 1-2 tracklets of 3..14 frames (PNG: lossless, exact values)."""
    root = tmp_path_factory.mktemp("toy")
    rng = np.random.default_rng(0)
    train, test = [], []
    for pid in range(6):
        for cam in range(2):
            for k in range(1 + (pid + cam) % 2):
                n = int(rng.integers(3, 15))
                t = (_tracklet(str(root / f"{pid}_{cam}_{k}"), n, base=pid * 3 + cam), pid, cam)
                (train if pid < 4 else test).append(t)
    query = [t for t in test if t[2] == 0]
    gallery = [t for t in test if t[2] == 1]
    return _DS(train, query, gallery)


# ----------------------------------------------------------------------------- frames


def test_read_clip_shape_resize_flip(toy):
    paths = toy.train[0][0]
    c = read_clip(paths, [0, 1, 2], size=SIZE)
    assert c.shape == (3, 3, 16, 8) and c.dtype == torch.uint8
    f = read_clip(paths, [0, 1, 2], size=SIZE, flip=True)
    assert torch.equal(f, c.flip(-1)) and not torch.equal(f, c)
    full = read_clip(paths, [2], size=(32, 16))
    assert torch.equal(full[:, 0].permute(1, 2, 0), torch.from_numpy(_frame(20)))  # pid 0, cam 0: base 0, frame 2


def test_bad_frames_are_skipped_and_counted(tmp_path, caplog):
    paths = list(_tracklet(str(tmp_path / "t"), 6))
    good = read_clip(paths, range(6), size=SIZE)
    with open(paths[1], "wb") as f:  # corrupt
        f.write(b"\x89PNG garbage")
    jpg = str(tmp_path / "t" / "004.jpg")  # truncated JPEG
    Image.fromarray(_frame(40)).save(jpg, quality=95)
    data = open(jpg, "rb").read()
    with open(jpg, "wb") as f:
        f.write(data[: len(data) // 2])
    paths[4] = jpg
    paths[5] = str(tmp_path / "missing.png")  # missing
    stats = FrameStats()
    c = read_clip(paths, range(6), size=SIZE, stats=stats)
    assert torch.equal(c[:, 1], good[:, 0])  # nearest good frame (earlier one wins the tie)
    assert torch.equal(c[:, 4], good[:, 3]) and torch.equal(c[:, 5], good[:, 3])
    assert torch.equal(c[:, [0, 2, 3]], good[:, [0, 2, 3]])
    assert stats.totals() == {"frames": 6, "bad_frames": 3, "unreadable_clips": 0}
    dead = read_clip([paths[1], paths[5]], [0, 1, 1], size=SIZE, stats=stats)
    assert dead.shape == (3, 3, 16, 8) and int(dead.sum()) == 0
    assert stats.totals()["unreadable_clips"] == 1
    with caplog.at_level(logging.WARNING, logger="personvlad.data"):
        line = stats.log_summary(epoch=3)
        assert stats.log_summary(epoch=4) is None  # nothing new since the last summary
    recs = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(recs) == 1 and "epoch 3" in line and "6 of 9 frames" in line
    with pytest.raises(ValueError, match="indices"):
        read_clip(paths, [6], size=SIZE)


def test_train_dataset_survives_bad_frames_in_workers(tmp_path, caplog):
    paths = list(_tracklet(str(tmp_path / "a"), 4)) + [str(tmp_path / "gone.png")]
    tr = [(tuple(paths), 0, 0), (_tracklet(str(tmp_path / "b"), 5), 1, 0)]
    dl = build_train_loader(tr, clip_len=5, size=SIZE, num_ids=2, num_per_id=2, workers=1, seed=0)
    with caplog.at_level(logging.WARNING, logger="personvlad.data"):
        for _ in range(2):
            for x, pids, _ in dl:
                assert x.shape == (4, 3, 5, 16, 8)
    assert dl.stats.totals()["bad_frames"] == 4  # 2 epochs x 2 clips of pid 0, one bad frame each
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(lines) == 2 and lines[0].startswith("epoch 0: 2 of 20 frames") and lines[1].startswith("epoch 1:")
    inf = build_train_loader(tr, clip_len=5, size=SIZE, num_ids=2, num_per_id=2, workers=0, seed=0, infinite=True)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="personvlad.data"):
        it = iter(inf)
        for _ in range(3 * len(inf)):
            next(it)
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 3


# ----------------------------------------------------------------------------- sampling


def test_test_clip_indices():
    assert test_clip_indices(40, 16, 8) == [list(range(s, s + 16)) for s in (0, 8, 16, 24)]
    assert test_clip_indices(16, 16, 8) == [list(range(16))]
    assert test_clip_indices(5, 8, 8) == [[0, 1, 2, 3, 4, 0, 1, 2]]
    for n in (1, 7, 23, 100):
        for c in test_clip_indices(n, 8, 4):
            assert len(c) == 8 and all(0 <= i < n for i in c)
    with pytest.raises(ValueError, match="stride"):
        test_clip_indices(10, 4, 0)


def test_train_clip_indices():
    rng = np.random.default_rng(0)
    starts = set()
    for _ in range(200):
        c = train_clip_indices(20, 8, rng=rng)
        assert c == list(range(c[0], c[0] + 8)) and 0 <= c[0] <= 12
        starts.add(c[0])
    assert starts == set(range(13))
    assert train_clip_indices(3, 7) == [0, 1, 2, 0, 1, 2, 0]
    r = random_test_clip(30, 8, np.random.default_rng(1))
    assert r == random_test_clip(30, 8, np.random.default_rng(1)) and len(r) == 8


def _tracks(pids):
    return [((f"{i}",), p, 0) for i, p in enumerate(pids)]


def test_identity_balanced_sampler():
    pids = [p for p in range(10) for _ in range(1 + p % 5)]  # 1..5 tracklets per id
    tr = _tracks(pids)
    s = IdentityBalancedSampler(tr, num_ids=4, num_per_id=2, seed=3)
    batches = list(s)
    assert len(batches) == len(s) > 0
    for b in batches:
        assert len(b) == 8
        ids = Counter(pids[i] for i in b)
        assert len(ids) == 4 and set(ids.values()) == {2}
        for p in ids:  # ids with >= K tracklets never repeat one inside a group
            sel = [i for i in b if pids[i] == p]
            if pids.count(p) >= 2:
                assert len(set(sel)) == 2
    assert list(IdentityBalancedSampler(tr, 4, 2, seed=3)) == batches  # deterministic
    s.set_epoch(1)
    assert list(s) != batches
    # DDP: ranks take disjoint, equally many batches of the same permutation
    r0 = list(IdentityBalancedSampler(tr, 2, 2, seed=3, rank=0, world_size=2))
    r1 = list(IdentityBalancedSampler(tr, 2, 2, seed=3, rank=1, world_size=2))
    full = list(IdentityBalancedSampler(tr, 2, 2, seed=3))
    assert len(r0) == len(r1) == len(full) // 2
    assert r0 == full[0::2][: len(r0)] and r1 == full[1::2][: len(r1)]
    inf = iter(IdentityBalancedSampler(tr, 4, 2, seed=3, infinite=True))
    assert len([next(inf) for _ in range(5 * len(batches))]) == 5 * len(batches)
    with pytest.raises(ValueError, match="num_ids"):
        IdentityBalancedSampler(tr, num_ids=11, num_per_id=2)
    with pytest.raises(ValueError, match="rank"):
        IdentityBalancedSampler(tr, 2, 2, rank=2, world_size=2)


def test_identity_balanced_sampler_uses_every_group_it_can():
    """Uniform picks could strand an identity's groups: with 3 groups of id 0
    and one of ids 1 and 2 (P=2), some epochs made 1 batch instead of 2, i.e.
    none at all on 2 ranks.  Largest-first makes the most batches every epoch."""
    pids = [0] * 6 + [1] * 2 + [2] * 2
    tr = _tracks(pids)
    for epoch in range(12):
        s = IdentityBalancedSampler(tr, num_ids=2, num_per_id=2, seed=1, world_size=2, rank=epoch % 2)
        s.set_epoch(epoch)
        assert len(s) == 1 and len(list(s)) == 1, epoch
    # an uneven set: every epoch has the same, largest possible count
    pids = [p for p in range(10) for _ in range(1 + 3 * (p % 4))]  # 1, 4, 7 or 10 tracklets
    tr = _tracks(pids)
    groups = {p: max(1, pids.count(p) // 2) for p in set(pids)}
    # b batches of 3 distinct ids fit iff sum_i min(g_i, b) >= 3 b (an id gives at most one group a batch)
    most = max(b for b in range(1, 40) if sum(min(g, b) for g in groups.values()) >= 3 * b)
    counts = set()
    for epoch in range(8):
        s = IdentityBalancedSampler(tr, num_ids=3, num_per_id=2, seed=5)
        s.set_epoch(epoch)
        counts.add(len(list(s)))
    assert counts == {most}, (counts, most)


def test_flip_probability(toy):
    tr = [toy.train[0]]
    n = len(tr[0][0])
    base = TrainClipDataset(tr, clip_len=n, size=SIZE, flip_p=0.0)[0][0]  # clip_len == n: the whole tracklet
    assert torch.equal(TrainClipDataset(tr, n, SIZE, flip_p=1.0)[0][0], base.flip(-1))
    torch.manual_seed(0)
    ds = TrainClipDataset(tr, n, SIZE, flip_p=0.5)
    flips = [torch.equal(ds[0][0], base.flip(-1)) for _ in range(200)]
    assert 70 < sum(flips) < 130
    with pytest.raises(ValueError, match="flip_p"):
        TrainClipDataset(tr, n, SIZE, flip_p=1.5)


# ----------------------------------------------------------------------------- loaders


@pytest.mark.parametrize("workers", [0, 2])
def test_train_loader_shapes(toy, workers):
    dl = build_train_loader(toy.train, clip_len=4, size=SIZE, num_ids=2, num_per_id=3, workers=workers, seed=1)
    n = 0
    for x, pids, camids in dl:
        assert x.shape == (6, 3, 4, 16, 8) and x.dtype == torch.uint8
        assert pids.dtype == torch.int64 and camids.dtype == torch.int64 and pids.shape == (6,)
        assert sorted(Counter(pids.tolist()).values()) == [3, 3]
        n += 1
    assert n == len(dl) > 0 and dl.sampler.epoch == 1


def test_train_loader_without_workers_follows_its_seed(toy):
    """workers=0: the clips come from the loader's seed, not from torch's
    global RNG (which they neither read nor advance)."""
    def batches(seed, global_seed):
        torch.manual_seed(global_seed)
        dl = build_train_loader(toy.train, clip_len=2, size=SIZE, num_ids=2, num_per_id=3, workers=0, seed=seed)
        out = [x for x, _, _ in dl]
        return out, torch.rand(())

    a, ra = batches(1, 0)
    b, rb = batches(1, 123)
    assert len(a) == len(b) > 0 and all(torch.equal(x, y) for x, y in zip(a, b))
    torch.manual_seed(0)
    assert torch.equal(ra, torch.rand(()))  # the global RNG was not advanced
    c, _ = batches(2, 0)
    assert not all(x.shape == y.shape and torch.equal(x, y) for x, y in zip(a, c))


def test_test_loader(toy):
    dl = build_test_loader(toy.gallery, clip_len=4, size=SIZE, stride=2, batch_size=5, workers=0)
    xs, ts = zip(*dl)
    x, t = torch.cat(xs), torch.cat(ts)
    counts = [len(test_clip_indices(len(p), 4, 2)) for p, _, _ in toy.gallery]
    assert x.shape == (sum(counts), 3, 4, 16, 8) and x.dtype == torch.uint8
    assert t.tolist() == [i for i, c in enumerate(counts) for _ in range(c)]
    assert dl.dataset.clip_counts.tolist() == counts
    r1 = TestClipDataset(toy.gallery, 4, SIZE, mode="random", seed=5)
    r2 = TestClipDataset(toy.gallery, 4, SIZE, mode="random", seed=5)
    assert len(r1) == len(toy.gallery) and r1.items == r2.items
    with pytest.raises(ValueError, match="mode"):
        TestClipDataset(toy.gallery, 4, SIZE, mode="every")


# ----------------------------------------------------------------------------- shards


@pytest.fixture(scope="module")
def shards(toy, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("shards"))
    pack_dataset(toy, out, size=SIZE, workers=1)
    return out


def test_pack_round_trip_equals_jpeg_path(toy, shards):
    st = ShardStore(shards)
    assert st.size == SIZE and st.meta["bad_frames"] == 0
    assert st.frames.shape[0] == sum(len(t[0]) for t in toy.train + toy.query + toy.gallery)
    for split in ("query", "gallery"):
        a = [(x, t) for x, t in build_test_loader(getattr(toy, split), 4, SIZE, stride=3, batch_size=4, workers=0)]
        b = [(x, t) for x, t in ShardTestLoader(shards, split, 4, stride=3, batch_size=4, threads=2)]
        assert torch.equal(torch.cat([x for x, _ in a]), torch.cat([x for x, _ in b]))
        assert torch.equal(torch.cat([t for _, t in a]), torch.cat([t for _, t in b]))
    rng = np.random.default_rng(0)
    for ti, (paths, _, _) in enumerate(toy.train):
        idx = rng.integers(0, len(paths), size=5).tolist()
        flip = bool(ti % 2)
        assert torch.equal(st.read_clip("train", ti, idx, flip=flip), read_clip(paths, idx, SIZE, flip=flip))


def test_pack_parallel_same_bytes(toy, shards, tmp_path):
    out = pack_dataset(toy, str(tmp_path / "p"), size=SIZE, workers=2)
    assert np.array_equal(ShardStore(out).frames, ShardStore(shards).frames)


def test_shard_train_loader(toy, shards):
    st = ShardStore(shards)
    s = st.split("train")
    dl = ShardTrainLoader(shards, clip_len=4, num_ids=2, num_per_id=3, seed=0, threads=2)
    seen_flip = seen_plain = 0
    batches = 0
    for x, pids, camids in dl:
        assert x.shape == (6, 3, 4, 16, 8) and x.dtype == torch.uint8 and pids.dtype == torch.int64
        assert sorted(Counter(pids.tolist()).values()) == [3, 3]
        for i in range(6):  # every clip is a looped run of one tracklet of that pid, maybe flipped
            cands = [ti for ti in range(len(s["pids"])) if s["pids"][ti] == pids[i] and s["camids"][ti] == camids[i]]
            ok = False
            for ti in cands:
                n = int(s["lengths"][ti])
                for start in range(max(1, n - 3)):
                    ref = st.read_clip("train", ti, [(start + j) % n for j in range(4)])
                    if torch.equal(x[i], ref):
                        ok, seen_plain = True, seen_plain + 1
                    elif torch.equal(x[i], ref.flip(-1)):
                        ok, seen_flip = True, seen_flip + 1
                    if ok:
                        break
                if ok:
                    break
            assert ok
        batches += 1
    assert batches == len(dl) > 0 and seen_flip > 0 and seen_plain > 0
    assert dl.epoch == 1


def test_shard_store_errors(shards, tmp_path):
    with pytest.raises(FileNotFoundError, match="index.npz"):
        ShardStore(str(tmp_path))
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in ("index.npz", "frames.u8"):
        data = open(os.path.join(shards, f), "rb").read()
        (bad / f).write_bytes(data[:-7] if f == "frames.u8" else data)
    with pytest.raises(ValueError, match="frames.u8.*bytes"):
        ShardStore(str(bad))


def test_shard_store_refuses_a_damaged_index(shards, tmp_path):
    """A damaged index.npz is a ValueError naming it, never a BadZipFile /
    KeyError / TypeError, nor offsets that make clips read another split's
    frames or past the end."""
    import json

    with np.load(os.path.join(shards, "index.npz"), allow_pickle=False) as z:
        good = {k: z[k] for k in z.files}
    n = int(json.loads(str(good["meta"]))["num_frames"])

    def store_with(index=None, raw=None):
        d = tmp_path / f"s{len(list(tmp_path.iterdir()))}"
        d.mkdir()
        os.link(os.path.join(shards, "frames.u8"), d / "frames.u8")
        if raw is not None:
            (d / "index.npz").write_bytes(raw)
        else:
            with open(d / "index.npz", "wb") as f:
                np.savez(f, **index)
        return str(d)

    assert ShardStore(store_with(good)).split("train")["lengths"].sum() > 0  # the copy itself is fine
    raw = open(os.path.join(shards, "index.npz"), "rb").read()
    meta = json.loads(str(good["meta"]))
    cases = {
        "truncated": dict(raw=raw[: len(raw) // 2]),
        "npy": dict(raw=open(os.path.join(shards, "frames.u8"), "rb").read()[:256]),
        "no size": dict(index={**good, "meta": np.asarray(json.dumps({k: v for k, v in meta.items() if k != "size"}))}),
        "no gallery_lengths": dict(index={k: v for k, v in good.items() if k != "gallery_lengths"}),
        "train into query": dict(index={**good, "train_lengths": good["train_lengths"] + 5}),
        "past the end": dict(index={**good, "gallery_lengths": good["gallery_lengths"] + n}),
        "short offsets": dict(index={**good, "gallery_offsets": good["gallery_offsets"][:-1]}),
    }
    for what, kw in cases.items():
        with pytest.raises(ValueError, match=r"index\.npz: (?:[a-z]+: )?expected"):
            ShardStore(store_with(**kw))


def test_a_single_path_is_not_a_tracklet(tmp_path):
    with pytest.raises(ValueError, match="tracklets: expected frame_paths to be a sequence of paths, got one path"):
        TrainClipDataset([(str(tmp_path / "f0.png"), 0, 0)], 4, (8, 4))


# ----------------------------------------------------------------------------- GPU paths (run by bench/gpu_check.sh)


@pytest.mark.cuda
def test_shard_loaders_cuda_match_cpu(shards):
    a = list(ShardTrainLoader(shards, clip_len=4, num_ids=2, num_per_id=3, seed=0, threads=2))
    b = list(ShardTrainLoader(shards, clip_len=4, num_ids=2, num_per_id=3, seed=0, threads=2, device="cuda"))
    assert len(a) == len(b) > 0
    for (x, p, c), (y, q, d) in zip(a, b):
        assert y.is_cuda and y.dtype == torch.uint8 and y.is_contiguous()
        assert torch.equal(x, y.cpu()) and torch.equal(p, q.cpu()) and torch.equal(c, d.cpu())
    for split in ("query", "gallery"):
        a = list(ShardTestLoader(shards, split, 4, stride=2, batch_size=3))
        b = list(ShardTestLoader(shards, split, 4, stride=2, batch_size=3, device="cuda"))
        assert torch.equal(torch.cat([x for x, _ in a]), torch.cat([y.cpu() for y, _ in b]))
        assert torch.equal(torch.cat([t for _, t in a]), torch.cat([t.cpu() for _, t in b]))


@pytest.mark.cuda
def test_gpu_jpeg_close_to_cpu(tmp_path):
    from personvlad.data.gpu_jpeg import GpuJpegTrainLoader, decode_clips_cuda, gpu_jpeg_available

    if not gpu_jpeg_available():
        pytest.skip("torchvision with decode_jpeg(device='cuda') is not installed")
    paths = list(_tracklet(str(tmp_path / "j"), 6, ext="jpg"))
    ref = read_clip(paths, range(6), size=(32, 16))
    got = decode_clips_cuda([paths], (32, 16), "cuda")
    assert got.shape == (1, 3, 6, 32, 16) and got.is_cuda
    assert (got[0].cpu().float() - ref.float()).abs().mean() < 3.0
    with open(paths[2], "wb") as f:
        f.write(b"\xff\xd8 broken")
    stats = FrameStats()
    got = decode_clips_cuda([paths, paths[:1] * 6], (32, 16), "cuda", stats=stats)
    assert torch.equal(got[0].cpu(), read_clip(paths, range(6), size=(32, 16)))  # CPU fallback for the bad clip
    assert stats.totals()["bad_frames"] == 1
    dl = GpuJpegTrainLoader([(tuple(paths), 0, 0), (tuple(paths[:3]), 1, 1)], clip_len=4, size=(32, 16),
                            num_ids=2, num_per_id=2)
    x, p, c = next(iter(dl))
    assert x.shape == (4, 3, 4, 32, 16) and x.is_cuda and sorted(p.tolist()) == [0, 0, 1, 1]


def test_gpu_jpeg_guarded_without_cuda_or_torchvision(monkeypatch):
    from personvlad.data import gpu_jpeg

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_jpeg.gpu_jpeg_available() is False
    with pytest.raises(RuntimeError, match="torchvision"):
        gpu_jpeg.GpuJpegTrainLoader([(("a.jpg",), 0, 0)], clip_len=2)


def test_pack_counts_bad_frames(tmp_path):
    paths = list(_tracklet(str(tmp_path / "a"), 4))
    os.remove(paths[2])
    ds = _DS([(tuple(paths), 0, 0)], [(tuple(paths[:2]), 1, 0)], [(tuple(paths[:1]), 1, 1)])
    st = ShardStore(pack_dataset(ds, str(tmp_path / "sh"), size=SIZE))
    assert st.meta["bad_frames"] == 1 and st.frames.shape == (7, 16, 8, 3)
    assert np.array_equal(st.frames[2], st.frames[1])  # the missing frame repeats its nearest good frame
    assert st.split("query")["offsets"].tolist() == [4] and st.split("gallery")["lengths"].tolist() == [1]
    with pytest.raises(ValueError, match="size"):
        pack_dataset(ds, str(tmp_path / "x"), size="64by32")


def test_cli_reports_bad_input_without_a_traceback(tmp_path, capsys, monkeypatch):
    """`personvlad <command>` with bad input: exit status 2 and one error line
    naming the problem (ValueError / FileNotFoundError), not a traceback;
    PERSONVLAD_TRACEBACK=1 raises instead."""
    from personvlad.cli import main

    missing = str(tmp_path / "no-such-root")
    argv = ["pack", "--dataset-root", missing, "--out", str(tmp_path / "out"), "--quiet"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("personvlad pack: error: ") and "no-such-root" in err and "Traceback" not in err
    monkeypatch.setenv("PERSONVLAD_TRACEBACK", "1")
    with pytest.raises((ValueError, FileNotFoundError), match="no-such-root"):
        main(argv)

"""Synthetic MARS-layout video re-id data (procedurally rendered pedestrians).

``generate(out_dir, preset, seed)`` writes a tree that :class:`personvlad.data.MARS`
reads::

    out_dir/bbox_train/<pid4>/<pid4>C<cam>T<trk4>F<frame3>.jpg   (256 x 128 JPEG)
    out_dir/bbox_test/...              (pid folders 00-1 = junk, 0000 = distractors)
    out_dir/info/train_name.txt, test_name.txt
    out_dir/info/tracks_train_info.mat (track_train_info: [start, end, pid, camid], 1-based, double)
    out_dir/info/tracks_test_info.mat  (track_test_info)
    out_dir/info/query_IDX.mat         (query_IDX: 1-based rows of track_test_info, 1 x Q double)
    out_dir/synth.json                 (preset, seed, counts; written last)

``ensure_generated(out_dir, preset, seed)`` generates only where needed: a
run killed mid-generation leaves ``synth.incomplete`` behind, and is redone.

Each identity has an appearance per body part (head: skin, hair, hat; torso:
two colours and a pattern, sleeves; legs: colour and style; shoes; bag).
Cameras have a colour cast, gamma and quality of their own, each tracklet an
illumination, a background crop with clutter, a bounding-box misalignment
(scale and shift, plus per-frame jitter), a walking gait (leg/arm swing,
horizontal drift) and possibly a moving occluder.  Some identities are
"twins" of another with one part changed (similar-looking distractors), and
the test gallery holds junk (-1: badly cropped people) and distractor (0:
background/clutter) tracklets like MARS.  Deterministic by ``seed``: every
tracklet is rendered from its own seeded RNG, so ``--workers`` does not change
a byte.
"""
from __future__ import annotations

import json
import os
import time
from functools import lru_cache
from typing import Dict, List, Optional

import numpy as np

H, W = 256, 128

PRESETS: Dict[str, dict] = {
    # ~16+16 ids, 3 cameras, 2 tracklets per id per camera, 8-24 frames: a few seconds
    "tiny": dict(train_ids=16, test_ids=16, num_cams=3, cams_per_id=(2, 3), tracklets_per_cam=(2, 2),
                 frames=(8, 24), junk=3, distractors=3, twin_frac=0.25, occlusion_p=0.3, quality=(85, 95),
                 nuisance=1.0),
    # quick experiments: ~40k frames
    "small": dict(train_ids=100, test_ids=100, num_cams=6, cams_per_id=(2, 4), tracklets_per_cam=(1, 3),
                  frames=(12, 48), junk=40, distractors=40, twin_frac=0.25, occlusion_p=0.3, quality=(80, 95)),
    # MARS counts: 625 train ids / 8298 train tracklets, 636 test ids, 12180 test tracklets
    # (3248 of them junk/distractors), ~58 frames per tracklet on average (~1.2M frames)
    "mars-scale": dict(train_ids=625, test_ids=636, num_cams=6, cams_per_id=(2, 6), train_tracklets=8298,
                       test_tracklets=12180, junk=1624, distractors=1624, frames_lognormal=(45.0, 0.7, 8, 400),
                       twin_frac=0.2, occlusion_p=0.3, quality=(80, 95)),
}

PALETTE = np.array([
    [200, 30, 35], [120, 20, 30], [235, 120, 20], [235, 210, 40], [40, 150, 50], [20, 80, 40],
    [30, 150, 150], [40, 80, 200], [25, 35, 90], [120, 50, 160], [235, 130, 180], [235, 235, 230],
    [130, 130, 135], [25, 25, 28], [110, 70, 35], [215, 190, 140],
], dtype=np.float32)
SKIN = np.array([[240, 200, 170], [210, 160, 120], [160, 110, 75], [100, 65, 40]], dtype=np.float32)
HAIR = np.array([[20, 15, 10], [90, 55, 25], [200, 170, 90], [150, 150, 150]], dtype=np.float32)
TORSO_PATTERNS = ("solid", "hstripe", "vstripe", "check", "split", "logo")
LEG_STYLES = ("trousers", "shorts", "skirt")
BAGS = ("none", "backpack", "handbag_l", "handbag_r")


# ----------------------------------------------------------------------------- identities


def _random_identity(rng: np.random.Generator) -> dict:
    nc = len(PALETTE)
    c1 = int(rng.integers(nc))
    c2 = int((c1 + rng.integers(1, nc)) % nc)
    return dict(
        skin=int(rng.integers(len(SKIN))), hair=int(rng.integers(len(HAIR))),
        hat=int(rng.integers(nc)) if rng.random() < 0.2 else -1,
        torso_c1=c1, torso_c2=c2, torso_pat=str(TORSO_PATTERNS[rng.integers(len(TORSO_PATTERNS))]),
        period=int(rng.choice([6, 9, 13])), long_sleeve=bool(rng.random() < 0.6),
        legs_c=int(rng.integers(nc)), legs_style=str(LEG_STYLES[rng.choice(3, p=[0.65, 0.2, 0.15])]),
        shoes_c=int(rng.choice([13, 11, 14, 12, 8, 0])),
        bag=str(BAGS[rng.choice(4, p=[0.45, 0.25, 0.15, 0.15])]), bag_c=int(rng.integers(nc)),
        build=float(rng.uniform(0.88, 1.12)), height=float(rng.uniform(0.92, 1.04)),
    )


def _key(a: dict) -> tuple:
    return (a["skin"], a["hair"], a["hat"], a["torso_c1"], a["torso_c2"], a["torso_pat"], a["legs_c"],
            a["legs_style"], a["shoes_c"], a["bag"], a["bag_c"] if a["bag"] != "none" else -1)


def _twin(rng: np.random.Generator, base: dict) -> dict:
    """A similar-looking identity: ``base`` with one part changed."""
    a = dict(base)
    nc = len(PALETTE)
    part = rng.choice(["legs", "shoes", "bag", "pattern", "hat", "c2"])
    if part == "legs":
        a["legs_c"] = int((a["legs_c"] + rng.integers(1, nc)) % nc)
    elif part == "shoes":
        a["shoes_c"] = int(rng.choice([c for c in (13, 11, 14, 12, 8, 0) if c != a["shoes_c"]]))
    elif part == "bag":
        a["bag"] = str(rng.choice([b for b in BAGS if b != a["bag"]]))
        a["bag_c"] = int(rng.integers(nc))
    elif part == "pattern":
        a["torso_pat"] = str(rng.choice([p for p in TORSO_PATTERNS if p != a["torso_pat"]]))
    elif part == "hat":
        a["hat"] = -1 if a["hat"] >= 0 else int(rng.integers(nc))
    else:
        a["torso_c2"] = int((a["torso_c2"] + rng.integers(1, nc)) % nc)
    return a


def _identities(rng: np.random.Generator, n: int, twin_frac: float, seen: set) -> List[dict]:
    out: List[dict] = []
    while len(out) < n:
        if out and rng.random() < twin_frac:
            a = _twin(rng, out[int(rng.integers(len(out)))])
        else:
            a = _random_identity(rng)
        k = _key(a)
        if k in seen:
            continue
        seen.add(k)
        out.append(a)
    return out


# ----------------------------------------------------------------------------- planning


def _plan_cams(rng: np.random.Generator, n_ids: int, cfg: dict, total: Optional[int]) -> List[List[int]]:
    """Per identity, the camera of each of its tracklets."""
    nc = cfg["num_cams"]
    lo, hi = cfg["cams_per_id"]
    plans = []
    for _ in range(n_ids):
        c = int(rng.integers(lo, min(hi, nc) + 1))
        cams = sorted(rng.choice(nc, size=c, replace=False).tolist())
        plans.append(cams)
    if total is None:
        tlo, thi = cfg["tracklets_per_cam"]
        return [[c for c in cams for _ in range(int(rng.integers(tlo, thi + 1)))] for cams in plans]
    base = sum(len(c) for c in plans)
    if total < base:
        raise ValueError(f"preset: {total} tracklets cannot cover {base} (id, camera) pairs")
    extra = rng.multinomial(total - base, np.full(n_ids, 1.0 / n_ids))
    out = []
    for cams, e in zip(plans, extra):
        more = rng.choice(cams, size=int(e)).tolist() if e else []
        out.append(sorted(cams + more))
    return out


def _num_frames(rng: np.random.Generator, cfg: dict) -> int:
    if "frames_lognormal" in cfg:
        med, sig, lo, hi = cfg["frames_lognormal"]
        return int(np.clip(round(med * np.exp(sig * rng.standard_normal())), lo, hi))
    lo, hi = cfg["frames"]
    return int(rng.integers(lo, hi + 1))


def _pid_str(pid: int) -> str:
    return "00-1" if pid == -1 else f"{pid:04d}"


# ----------------------------------------------------------------------------- rendering

_YY, _XX = np.mgrid[0:H, 0:W].astype(np.float32)


@lru_cache(maxsize=16)
def _scene(seed: int, cam: int) -> np.ndarray:
    """A camera's background scene, wider than a box: (H, 2W, 3) float32."""
    rng = np.random.default_rng([seed, 7919, cam])
    sw = 2 * W
    wall = rng.uniform(60, 200, size=3).astype(np.float32)
    floor = rng.uniform(50, 170, size=3).astype(np.float32)
    img = np.empty((H, sw, 3), np.float32)
    horizon = int(rng.integers(int(0.55 * H), int(0.75 * H)))
    img[:horizon] = wall
    grad = np.linspace(0.85, 1.15, H - horizon, dtype=np.float32)[:, None, None]
    img[horizon:] = floor * grad
    for _ in range(int(rng.integers(6, 12))):  # windows, shop fronts, signs
        x0, y0 = int(rng.integers(0, sw - 10)), int(rng.integers(0, horizon - 10))
        w, h = int(rng.integers(10, 60)), int(rng.integers(10, 80))
        img[y0:min(y0 + h, horizon), x0:x0 + w] = rng.uniform(20, 240, size=3)
    for _ in range(int(rng.integers(1, 4))):  # poles
        x0 = int(rng.integers(0, sw - 6))
        img[:, x0:x0 + int(rng.integers(3, 8))] = rng.uniform(30, 120)
    tile = rng.normal(0, 6, size=(H, sw, 1)).astype(np.float32)
    img += tile
    return img


def _camera(seed: int, cam: int, nuisance: float = 1.0):
    """A camera's colour cast (RGB gains) and gamma; ``nuisance`` scales their strength."""
    rng = np.random.default_rng([seed, 104729, cam])
    gains = rng.uniform(0.78, 1.22, size=3)
    gains /= gains.mean() ** 0.5
    gamma = float(rng.uniform(0.8, 1.25))
    gains = 1.0 + nuisance * (gains - 1.0)
    return gains.astype(np.float32), 1.0 + nuisance * (gamma - 1.0)


def _lut(gains, gamma, illum) -> np.ndarray:
    x = np.arange(256, dtype=np.float32) / 255.0
    return np.stack([np.clip(255.0 * (x ** gamma) * g * illum, 0, 255) for g in gains]).astype(np.uint8)


def _pattern(kind: str, period: int, yy, xx):
    if kind == "hstripe":
        return (yy // period) % 2 == 1
    if kind == "vstripe":
        return (xx // period) % 2 == 1
    if kind == "check":
        return ((yy // period) + (xx // period)) % 2 == 1
    if kind == "split":
        return xx >= 0
    if kind == "logo":
        return (np.abs(xx) < 2.2 * period) & (yy > period) & (yy < 3.4 * period)
    return np.zeros(np.broadcast(yy, xx).shape, bool)


def _paint(img, mask, colour, sl):
    """img[sl][mask] = colour (mask over the window ``sl``)."""
    if mask.any():
        img[sl][mask] = colour


def _window(y0, y1, x0, x1):
    y0, y1 = max(int(np.floor(y0)), 0), min(int(np.ceil(y1)) + 1, H)
    x0, x1 = max(int(np.floor(x0)), 0), min(int(np.ceil(x1)) + 1, W)
    if y1 <= y0 or x1 <= x0:
        return None
    return (slice(y0, y1), slice(x0, x1))


def _render_person(img, a: dict, cx: float, top: float, ph: float, phase: float, mirror: bool, part_mask=None):
    """Draw identity ``a`` into ``img`` (float32 H x W x 3); person height ``ph``
    pixels from ``top``; centre column ``cx``; gait ``phase``."""
    skin = SKIN[a["skin"]]
    pw = ph * 0.25 * a["build"]
    swing = np.sin(phase)
    # legs: two sheared bars from the hip, swinging in opposition
    hip, ankle = top + 0.50 * ph, top + 0.93 * ph
    legw = 0.42 * pw
    legs_c = PALETTE[a["legs_c"]]
    knee_len = ankle - hip
    for side, sgn in ((-1, 1.0), (1, -1.0)):
        lx = cx + side * 0.24 * pw
        amp = sgn * swing * 0.09 * ph
        sl = _window(hip, ankle + 0.07 * ph, lx - legw - abs(amp), lx + legw + abs(amp))
        if sl is None:
            continue
        yy, xx = _YY[sl], _XX[sl]
        frac = np.clip((yy - hip) / knee_len, 0, 1)
        xc = lx + amp * frac
        inleg = (np.abs(xx - xc) <= legw / 2) & (yy >= hip) & (yy < ankle)
        if a["legs_style"] == "shorts":
            lower = yy > hip + 0.38 * knee_len
            _paint(img, inleg & ~lower, legs_c, sl)
            _paint(img, inleg & lower, skin, sl)
        elif a["legs_style"] == "skirt":
            _paint(img, inleg, skin, sl)
        else:
            _paint(img, inleg, legs_c, sl)
        shoe = (np.abs(xx - (xc + 0.15 * legw * (1 if not mirror else -1))) <= 0.62 * legw) & \
               (yy >= ankle) & (yy < ankle + 0.06 * ph)
        _paint(img, shoe, PALETTE[a["shoes_c"]], sl)
    if a["legs_style"] == "skirt":
        sl = _window(hip - 2, hip + 0.4 * knee_len, cx - pw, cx + pw)
        if sl is not None:
            yy, xx = _YY[sl], _XX[sl]
            halfw = 0.5 * pw + (yy - hip) * 0.35
            _paint(img, (np.abs(xx - cx) <= halfw) & (yy >= hip - 2) & (yy < hip + 0.4 * knee_len), legs_c, sl)
    # arms (behind the torso edges), swinging against the legs
    sh, hand = top + 0.17 * ph, top + 0.48 * ph
    armw = 0.22 * pw
    c1, c2 = PALETTE[a["torso_c1"]], PALETTE[a["torso_c2"]]
    for side, sgn in ((-1, -1.0), (1, 1.0)):
        ax = cx + side * (0.5 * pw + 0.45 * armw)
        amp = sgn * swing * 0.05 * ph
        sl = _window(sh, hand + 4, ax - armw - abs(amp), ax + armw + abs(amp))
        if sl is None:
            continue
        yy, xx = _YY[sl], _XX[sl]
        frac = np.clip((yy - sh) / (hand - sh), 0, 1)
        inarm = (np.abs(xx - (ax + amp * frac)) <= armw / 2) & (yy >= sh) & (yy < hand)
        sleeve = yy < (hand if a["long_sleeve"] else sh + 0.35 * (hand - sh))
        _paint(img, inarm & sleeve, c1, sl)
        _paint(img, inarm & ~sleeve, skin, sl)
    # torso with its pattern
    t0, t1 = top + 0.16 * ph, top + 0.52 * ph
    sl = _window(t0, t1, cx - pw / 2, cx + pw / 2)
    if sl is not None:
        yy, xx = _YY[sl], _XX[sl]
        inside = (np.abs(xx - cx) <= pw / 2) & (yy >= t0) & (yy < t1)
        rel_x = (xx - cx) * (-1 if mirror else 1)
        pat = _pattern(a["torso_pat"], max(3, int(a["period"] * ph / 230)), (yy - t0).astype(np.int32),
                       np.floor(rel_x).astype(np.int32))
        _paint(img, inside & ~pat, c1, sl)
        _paint(img, inside & pat, c2, sl)
        if a["bag"] == "backpack":  # straps
            for s in (-0.22, 0.22):
                strap = (np.abs(xx - (cx + s * pw)) <= max(1.5, 0.04 * pw)) & inside & (yy < t0 + 0.6 * (t1 - t0))
                _paint(img, strap, PALETTE[a["bag_c"]], sl)
    # head: face, hair, optional hat
    hc, hr = top + 0.075 * ph, 0.07 * ph
    sl = _window(hc - hr, hc + hr + 0.04 * ph, cx - hr, cx + hr)
    if sl is not None:
        yy, xx = _YY[sl], _XX[sl]
        head = ((xx - cx) / (0.78 * hr)) ** 2 + ((yy - hc) / hr) ** 2 <= 1.0
        neck = (np.abs(xx - cx) <= 0.3 * hr) & (yy > hc) & (yy < top + 0.17 * ph)
        _paint(img, head | neck, skin, sl)
        _paint(img, head & (yy < hc - 0.25 * hr), HAIR[a["hair"]], sl)
        if a["hat"] >= 0:
            _paint(img, head & (yy < hc - 0.35 * hr), PALETTE[a["hat"]], sl)
    # bag
    if a["bag"] == "backpack":
        side = 1 if mirror else -1
        sl = _window(t0, t0 + 0.55 * (t1 - t0), cx + side * 0.5 * pw - 0.2 * pw, cx + side * 0.5 * pw + 0.2 * pw)
        if sl is not None:
            yy, xx = _YY[sl], _XX[sl]
            blk = (np.abs(xx - (cx + side * 0.58 * pw)) <= 0.16 * pw) & (yy >= t0 + 2)
            _paint(img, blk, PALETTE[a["bag_c"]], sl)
    elif a["bag"] in ("handbag_l", "handbag_r"):
        side = -1 if a["bag"] == "handbag_l" else 1
        if mirror:
            side = -side
        bx = cx + side * (0.5 * pw + 0.45 * armw) + side * swing * 0.05 * ph * 0.9
        by = hand - 0.02 * ph
        sl = _window(by, by + 0.12 * ph, bx - 0.16 * ph, bx + 0.16 * ph)
        if sl is not None:
            yy, xx = _YY[sl], _XX[sl]
            _paint(img, (np.abs(xx - bx) <= 0.07 * ph) & (yy >= by) & (yy < by + 0.11 * ph),
                   PALETTE[a["bag_c"]], sl)


def _clutter(rng, img, n):
    for _ in range(n):
        x0, y0 = int(rng.integers(-20, W)), int(rng.integers(0, H - 20))
        w, h = int(rng.integers(8, 40)), int(rng.integers(15, 90))
        sl = _window(y0, y0 + h, x0, x0 + w)
        if sl is not None:
            img[sl] = PALETTE[int(rng.integers(len(PALETTE)))] * rng.uniform(0.6, 1.0)


def render_tracklet(job: dict) -> List[np.ndarray]:
    """All frames (uint8 H x W x 3) of one planned tracklet."""
    from PIL import Image

    rng = np.random.default_rng(job["rng"])
    seed, cam, kind, n = job["seed"], job["cam"], job["kind"], job["frames"]
    a = job.get("attrs")
    nu = float(job.get("nuisance", 1.0))
    gains, gamma = _camera(seed, cam, nu)
    lut = _lut(gains, gamma, 1.0 + nu * float(rng.uniform(-0.3, 0.2))).ravel().tolist()
    scene = _scene(seed, cam)
    bx = int(rng.integers(0, scene.shape[1] - W))
    bg = scene[:, bx:bx + W].copy()
    _clutter(rng, bg, int(round(nu * int(rng.integers(0, 4)))))
    bg = np.clip(bg, 0, 255).astype(np.uint8)  # frames are painted in uint8 (values are truncated like astype)
    occ_p = job["occlusion_p"] * nu
    # bounding-box misalignment for the tracklet, per-frame jitter below
    s = 1.0 - nu * float(rng.uniform(0.0, 0.28))
    dx, dy = nu * float(rng.uniform(-14, 14)), nu * float(rng.uniform(-18, 18))
    jit = 1.5 * nu
    if kind == "junk":  # bad detections: far too big, or cut off
        s = float(rng.uniform(1.3, 2.0))
        dx, dy = float(rng.uniform(-40, 40)), float(rng.uniform(-150, 60))
    vx = float(rng.uniform(-0.6, 0.6))
    phase0, freq = float(rng.uniform(0, 2 * np.pi)), float(rng.uniform(0.5, 0.9))
    mirror = bool(rng.random() < 0.5)
    occ = None
    if kind != "distractor" and rng.random() < occ_p:
        occ = dict(kind=str(rng.choice(["pole", "bottom", "side"])), x=float(rng.uniform(-20, W + 20)),
                   v=float(rng.uniform(-4, 4)), size=float(rng.uniform(0.2, 0.45)),
                   colour=rng.uniform(20, 220, size=3).astype(np.float32))
    frames = []
    for t in range(n):
        img = bg.copy()
        if kind != "distractor":
            ph = 230.0 * s * a["height"] * (1.0 + nu * float(rng.uniform(-0.03, 0.03)))
            top = (H - ph) / 2 + dy + jit * float(rng.standard_normal())
            cx = W / 2 + dx + nu * vx * t + jit * float(rng.standard_normal())
            _render_person(img, a, cx, top, ph, phase0 + freq * t, mirror)
        else:
            _clutter(rng, img, 1)
        if occ is not None:
            ox = occ["x"] + occ["v"] * t
            if occ["kind"] == "pole":
                sl = _window(0, H, ox, ox + 8 + 30 * occ["size"])
            elif occ["kind"] == "bottom":
                sl = _window(H * (1 - occ["size"]), H, 0, W)
            else:
                sl = _window(H * 0.3, H, ox - 0.5 * W * occ["size"], ox + 0.5 * W * occ["size"])
            if sl is not None:
                img[sl] = occ["colour"]
        frames.append(np.asarray(Image.fromarray(img).point(lut)))
    return frames


def _savemat(path: str, key: str, arr: np.ndarray) -> None:
    """scipy.io.savemat with a fixed header text (scipy writes the creation time
    into it), so the same seed gives the same bytes."""
    import io

    from scipy.io import savemat

    buf = io.BytesIO()
    savemat(buf, {key: arr})
    data = bytearray(buf.getvalue())
    text = b"MATLAB 5.0 MAT-file, written by personvlad.data.synth"
    data[:116] = text.ljust(116, b" ")
    with open(path, "wb") as f:
        f.write(bytes(data))


def _write_job(job: dict) -> int:
    from PIL import Image

    frames = render_tracklet(job)
    d = os.path.join(job["out"], job["dir"])
    for name, fr in zip(job["names"], frames):
        Image.fromarray(fr).save(os.path.join(d, name), format="JPEG", quality=job["quality"])
    return len(frames)


# ----------------------------------------------------------------------------- the generator


def _config(preset) -> dict:
    if isinstance(preset, dict):
        cfg = dict(PRESETS["tiny"])
        unknown = set(preset) - set(PRESETS["mars-scale"]) - set(cfg)
        if unknown:
            raise ValueError(f"preset: unknown keys {sorted(unknown)}")
        cfg.update(preset)
        if "frames_lognormal" in preset:
            cfg.pop("frames", None)
        return cfg
    if preset not in PRESETS:
        raise ValueError(f"preset: expected one of {sorted(PRESETS)} or a dict of overrides; got {preset!r}")
    return PRESETS[preset]


def _build_plan(preset, seed: int):
    cfg = _config(preset)
    rng = np.random.default_rng([int(seed), 1])
    n_tr, n_te = cfg["train_ids"], cfg["test_ids"]
    pids = np.sort(rng.choice(np.arange(1, 2 * (n_tr + n_te) + 1), size=n_tr + n_te, replace=False))
    perm = rng.permutation(len(pids))
    train_pids = sorted(pids[perm[:n_tr]].tolist())
    test_pids = sorted(pids[perm[n_tr:]].tolist())
    seen: set = set()
    tr_attrs = _identities(rng, n_tr, cfg["twin_frac"], seen)
    te_attrs = _identities(rng, n_te, cfg["twin_frac"], seen)
    quality = {c: int(rng.integers(cfg["quality"][0], cfg["quality"][1] + 1)) for c in range(cfg["num_cams"])}
    tr_cams = _plan_cams(rng, n_tr, cfg, cfg.get("train_tracklets"))
    te_total = cfg.get("test_tracklets")
    te_cams = _plan_cams(rng, n_te, cfg, None if te_total is None else te_total - cfg["junk"] - cfg["distractors"])

    def tracks(pid_list, attrs, cams_list, split):
        out = []
        for pid, a, cams in zip(pid_list, attrs, cams_list):
            counter: Dict[int, int] = {}
            for c in cams:
                counter[c] = counter.get(c, 0) + 1
                out.append(dict(pid=pid, cam=c, trk=counter[c], attrs=a, kind="person", split=split))
        return out

    train = tracks(train_pids, tr_attrs, tr_cams, "train")
    test = []
    for kind, pid, count in (("junk", -1, cfg["junk"]), ("distractor", 0, cfg["distractors"])):
        counter = {}
        for _ in range(count):
            c = int(rng.integers(cfg["num_cams"]))
            counter[c] = counter.get(c, 0) + 1
            a = te_attrs[int(rng.integers(n_te))] if kind == "junk" else None
            test.append(dict(pid=pid, cam=c, trk=counter[c], attrs=a, kind=kind, split="test"))
    test.sort(key=lambda d: (d["pid"], d["cam"], d["trk"]))
    test += tracks(test_pids, te_attrs, te_cams, "test")
    # queries: per test id, one tracklet in each of 1..(c-1) of its cameras; the other cameras keep gallery matches
    query_rows = []
    by_id: Dict[int, List[int]] = {}
    for i, t in enumerate(test):
        if t["pid"] > 0:
            by_id.setdefault(t["pid"], []).append(i)
    for pid in test_pids:
        rows = by_id[pid]
        cams = sorted({test[r]["cam"] for r in rows})
        nq = int(rng.integers(1, len(cams)))
        for c in sorted(rng.choice(cams, size=nq, replace=False).tolist()):
            cand = [r for r in rows if test[r]["cam"] == c]
            query_rows.append(int(cand[int(rng.integers(len(cand)))]))
    query_rows.sort()
    for split, lst in (("train", train), ("test", test)):
        for i, t in enumerate(lst):
            t["frames"] = _num_frames(np.random.default_rng([int(seed), 2, 0 if split == "train" else 1, i]), cfg)
            t["rng"] = [int(seed), 3, 0 if split == "train" else 1, i]
            t["quality"] = quality[t["cam"]]
    return cfg, train, test, query_rows


INCOMPLETE = "synth.incomplete"  # present from the start of generate() until synth.json is written


def ensure_generated(out_dir, preset="tiny", seed: int = 0, workers: int = 1, progress: bool = False) -> bool:
    """Make ``out_dir`` hold the complete synthetic set of ``preset`` and
    ``seed``: generate it when the folder is absent or empty, or when an
    earlier generation was interrupted (its ``synth.incomplete`` marker is
    still there); reuse it when ``synth.json`` records the same preset and
    seed.  Returns True when it generated.  ValueError (naming ``out_dir``)
    for a folder holding something else: another preset or seed, or files
    not written by :func:`generate` -- nothing is overwritten then."""
    out_dir = os.fspath(out_dir)
    meta_path = os.path.join(out_dir, "synth.json")
    want = preset if isinstance(preset, str) else "custom"
    interrupted = os.path.exists(os.path.join(out_dir, INCOMPLETE))
    if os.path.isfile(meta_path) and not interrupted:
        try:
            with open(meta_path) as f:
                meta = json.load(f)
        except (OSError, ValueError) as e:
            raise ValueError(f"out_dir: {meta_path} is unreadable ({e}); delete {out_dir} to regenerate") from None
        if (meta.get("preset"), meta.get("seed")) != (want, int(seed)):
            raise ValueError(f"out_dir: {out_dir} holds the synthetic set of preset {meta.get('preset')!r} seed "
                             f"{meta.get('seed')!r}, not {want!r} seed {int(seed)}; choose another folder")
        return False
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not interrupted:
        raise ValueError(f"out_dir: {out_dir} is not empty and holds no complete synthetic set (no synth.json, "
                         f"no {INCOMPLETE} marker of an interrupted generation); choose an empty folder")
    generate(out_dir, preset=preset, seed=seed, workers=workers, progress=progress)
    return True


def generate(out_dir, preset: str = "tiny", seed: int = 0, workers: int = 1, progress: bool = False) -> str:
    """Write a synthetic MARS-layout dataset to ``out_dir`` (see module doc) and
    return ``out_dir``.  ``preset``: "tiny", "small", "mars-scale", or a dict
    overriding keys of ``PRESETS["tiny"]`` (e.g. for very small test trees).  ``workers`` > 1 renders tracklets in parallel
    processes (same bytes as ``workers=1``)."""
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed: expected a non-negative integer; got {seed!r}")
    if not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers: expected a positive integer; got {workers!r}")
    out_dir = os.fspath(out_dir)
    t0 = time.time()
    cfg, train, test, query_rows = _build_plan(preset, int(seed))
    os.makedirs(out_dir, exist_ok=True)
    marker = os.path.join(out_dir, INCOMPLETE)
    with open(marker, "w") as f:  # removed once synth.json is in place: see ensure_generated
        f.write("generation in progress or interrupted; run generate() again\n")
    os.makedirs(os.path.join(out_dir, "info"), exist_ok=True)
    jobs = []
    for home, lst, fname, mname, key in (("bbox_train", train, "train_name.txt", "tracks_train_info.mat",
                                          "track_train_info"),
                                         ("bbox_test", test, "test_name.txt", "tracks_test_info.mat",
                                          "track_test_info")):
        names_all: List[str] = []
        rows = []
        for t in lst:
            ps = _pid_str(t["pid"])
            names = [f"{ps}C{t['cam'] + 1}T{t['trk']:04d}F{f + 1:03d}.jpg" for f in range(t["frames"])]
            start = len(names_all) + 1
            names_all.extend(names)
            rows.append([start, len(names_all), t["pid"], t["cam"] + 1])
            os.makedirs(os.path.join(out_dir, home, ps), exist_ok=True)
            jobs.append(dict(out=out_dir, dir=os.path.join(home, ps), names=names, seed=int(seed), cam=t["cam"],
                             kind=t["kind"], frames=t["frames"], attrs=t["attrs"], rng=t["rng"],
                             quality=t["quality"], occlusion_p=cfg["occlusion_p"],
                             nuisance=float(cfg.get("nuisance", 1.0))))
        with open(os.path.join(out_dir, "info", fname), "w") as f:
            f.write("\n".join(names_all) + "\n")
        _savemat(os.path.join(out_dir, "info", mname), key, np.asarray(rows, dtype=np.float64).reshape(-1, 4))
    _savemat(os.path.join(out_dir, "info", "query_IDX.mat"), "query_IDX",
             (np.asarray(query_rows, dtype=np.float64) + 1)[None, :])
    nframes = 0
    if workers == 1:
        for j in jobs:
            nframes += _write_job(j)
    else:
        import multiprocessing as mp

        with mp.get_context("fork" if hasattr(os, "fork") else "spawn").Pool(workers) as pool:
            done = 0
            for k in pool.imap_unordered(_write_job, jobs, chunksize=max(1, len(jobs) // (workers * 16))):
                nframes += k
                done += 1
                if progress and done % max(1, len(jobs) // 20) == 0:
                    print(f"synth: {done}/{len(jobs)} tracklets", flush=True)
    meta = dict(preset=preset if isinstance(preset, str) else "custom", seed=int(seed), train_ids=cfg["train_ids"], test_ids=cfg["test_ids"],
                train_tracklets=len(train), test_tracklets=len(test), queries=len(query_rows),
                junk_tracklets=cfg["junk"], distractor_tracklets=cfg["distractors"], frames=nframes,
                frame_size=[H, W])
    tmp = os.path.join(out_dir, "synth.json.tmp")
    with open(tmp, "w") as f:
        json.dump(meta, f, indent=1, sort_keys=True)
    os.replace(tmp, os.path.join(out_dir, "synth.json"))
    os.unlink(marker)
    if progress:
        print(f"synth: {nframes} frames in {time.time() - t0:.1f}s -> {out_dir}", flush=True)
    return out_dir

"""Online Instance Matching loss (SPEC §4).

``OIMLoss`` keeps a look-up table (LUT) with one L2-normalised feature per
labeled identity and a circular queue of features of unlabeled samples.
The logits of a sample ``x`` (L2-normalised inside) are
``x · [LUT; queue]ᵀ / temperature``; the loss is the cross-entropy over the
labeled samples of the batch.

Update rule (after the loss, no gradient), in batch order:

* labeled ``x`` with id ``y``: ``LUT[y] = normalize(momentum*LUT[y] + (1-momentum)*x)``.
  The updates are applied *sequentially* in batch order, so an id that
  occurs several times in a batch is moved several times (the updates
  compound: the second occurrence starts from the LUT row the first one
  produced).  This is what the original OIM implementation's per-sample loop
  does.  It is computed in rounds (all first occurrences of every id at once,
  then all second occurrences, ...), which is exactly the sequential result.
* unlabeled ``x`` (label ``-1``): written to the queue at ``queue_ptr``,
  which advances (and wraps) by one per sample; if a batch has more
  unlabeled samples than the queue holds, only the last ``queue_size``
  remain, as a sequential write would leave them.

Every queue slot takes part, as SPEC §4 writes the logits: a slot never
written yet holds a zero feature (logit 0), as in the original OIM, whose
queue starts at zero.  ``skip_unwritten=True`` leaves those slots out of the
partition function instead (and out of the sampled negatives), so a fresh
loss with a large queue is not dominated by ``queue_size`` zero logits.

Under an initialised ``torch.distributed`` process group with more than one
process the (detached, normalised) features and the labels of every rank are
all-gathered (in rank order) before the update, so every rank applies the
same updates and holds identical buffers; the gradient stays local.  The
ranks' batch sizes may differ.

Updates happen only in training mode (``loss.train()``, the default); in
``eval()`` mode the forward computes the loss and leaves the buffers alone.
"""
from __future__ import annotations

import math
import numbers
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["OIMLoss"]


def _check_int(name: str, value, lo: int) -> int:
    """``value`` as a Python int: any integral number (numpy's too), not a bool."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < lo:
        raise ValueError(f"{name}: expected an int >= {lo}, got {value!r}")
    return int(value)


def _dist_world() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


def _to(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small host tensor on ``device`` without a device sync: through pinned
    memory, non-blocking (the pinned block is kept until the copy is done)."""
    if device.type != "cuda":
        return t
    return t.pin_memory().to(device, non_blocking=True)


def _all_gather(t: torch.Tensor) -> torch.Tensor:
    world = torch.distributed.get_world_size()
    out = [torch.empty_like(t) for _ in range(world)]
    torch.distributed.all_gather(out, t.contiguous())
    return torch.cat(out, 0)


def _gather_batches(x: torch.Tensor, host: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Every rank's features and host labels, in rank order.  The ranks may
    hold different batch sizes (the last batch of a DistributedSampler
    without drop_last): the sizes are gathered first (one small collective
    and a sync), each batch is padded to the largest and the padding dropped
    after the gather.  all_gather itself needs equal sizes."""
    n = x.shape[0]
    sizes = _all_gather(torch.tensor([n], dtype=torch.long, device=x.device)).cpu()
    m = int(sizes.max())
    if m != n:
        x = torch.cat([x, x.new_zeros(m - n, x.shape[1])], 0)
        host = torch.cat([host, host.new_full((m - n,), -1)], 0)
    xs = _all_gather(x.contiguous())
    hs = _all_gather(_to(host, x.device)).cpu()  # a sync, beside the collective
    if int(sizes.min()) == m:
        return xs, hs
    keep = (torch.arange(m)[None, :] < sizes[:, None]).flatten()  # rank-major, like the gather
    return xs[_to(keep, xs.device)], hs[keep]


class OIMLoss(nn.Module):
    """OIM loss with a labeled look-up table and an unlabeled circular queue.

    Args:
        num_features: feature dimension ``D``.
        num_labeled: number of labeled identities ``L`` (labels ``0..L-1``).
        queue_size: slots of the unlabeled queue (0 disables it).
        temperature: softmax temperature (the paper's 1/10).
        momentum: LUT momentum (0.5).
        num_sampled: ``None`` uses every LUT/queue entry in the partition
            function; ``S`` uses the target plus ``S`` negatives drawn
            uniformly without replacement from the other entries (per
            sample, from the global torch RNG of the features' device).
        skip_unwritten: leave the queue slots never written yet out of the
            loss (default ``False``: they count, as zero features, per SPEC §4).

    ``forward(features (N, D), labels (N,)) -> scalar``.
    Buffers: ``lut`` (L, D), ``queue`` (Q, D), ``queue_ptr`` (), ``queue_filled`` ().
    """

    # An OIMLoss pickled before the option existed has no instance attribute:
    # it left the unwritten slots out, so it goes on doing so.
    skip_unwritten = True

    def __init__(
        self,
        num_features: int,
        num_labeled: int,
        queue_size: int = 5000,
        temperature: float = 0.1,
        momentum: float = 0.5,
        num_sampled: Optional[int] = None,
        *,
        skip_unwritten: bool = False,
    ) -> None:
        super().__init__()
        num_features = _check_int("num_features", num_features, 1)
        num_labeled = _check_int("num_labeled", num_labeled, 1)
        queue_size = _check_int("queue_size", queue_size, 0)
        if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) \
                or not math.isfinite(temperature) or temperature <= 0:
            raise ValueError(f"temperature: expected a finite float > 0, got {temperature!r}")
        if isinstance(momentum, bool) or not isinstance(momentum, numbers.Real) \
                or not (0.0 <= float(momentum) <= 1.0):
            raise ValueError(f"momentum: expected a float in [0, 1], got {momentum!r}")
        if num_sampled is not None:
            num_sampled = _check_int("num_sampled", num_sampled, 1)
        if not isinstance(skip_unwritten, bool):
            raise ValueError(f"skip_unwritten: expected a bool, got {skip_unwritten!r}")
        self.num_features = num_features
        self.num_labeled = num_labeled
        self.queue_size = queue_size
        self.temperature = float(temperature)
        self.momentum = float(momentum)
        self.num_sampled = num_sampled
        self.skip_unwritten = skip_unwritten
        self.register_buffer("lut", torch.zeros(num_labeled, num_features))
        self.register_buffer("queue", torch.zeros(queue_size, num_features))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("queue_filled", torch.zeros((), dtype=torch.long))

    def extra_repr(self) -> str:
        return (f"num_features={self.num_features}, num_labeled={self.num_labeled}, "
                f"queue_size={self.queue_size}, temperature={self.temperature}, "
                f"momentum={self.momentum}, num_sampled={self.num_sampled}"
                + (", skip_unwritten=True" if self.skip_unwritten else ""))

    # ------------------------------------------------------------------ checks
    def _validate(self, features, labels) -> torch.Tensor:
        """Checks the arguments; returns the labels on the host (a copy, one
        device sync, when they were given on a GPU)."""
        if not isinstance(features, torch.Tensor):
            raise ValueError(f"features: expected a Tensor (N, {self.num_features}), got {type(features).__name__}")
        if features.dim() != 2 or features.shape[1] != self.num_features:
            raise ValueError(f"features: expected shape (N, {self.num_features}), got {tuple(features.shape)}")
        if not features.is_floating_point():
            raise ValueError(f"features: expected a floating dtype, got {features.dtype}")
        if not isinstance(labels, torch.Tensor):
            raise ValueError(f"labels: expected an integer Tensor (N,), got {type(labels).__name__}")
        if labels.dim() != 1 or labels.shape[0] != features.shape[0]:
            raise ValueError(f"labels: expected shape ({features.shape[0]},), got {tuple(labels.shape)}")
        if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise ValueError(f"labels: expected an integer dtype, got {labels.dtype}")
        if labels.device != features.device and labels.device.type != "cpu":
            raise ValueError(f"labels: expected device {features.device} (as features) or the CPU, "
                             f"got {labels.device}")
        if features.device != self.lut.device:
            raise ValueError(f"features: expected device {self.lut.device} (the loss buffers'), got {features.device}")
        host = labels.detach().to("cpu").long()
        if host.numel():
            lo, hi = int(host.min()), int(host.max())
            if lo < -1 or hi >= self.num_labeled:
                raise ValueError(
                    f"labels: expected values in [0, {self.num_labeled}) or -1 (unlabeled), "
                    f"got values in [{lo}, {hi}]")
        return host

    # ------------------------------------------------------------------ forward
    def table(self) -> torch.Tensor:
        """The matrix the logits are taken against (a copy): (L + Q, D), or
        with ``skip_unwritten`` (L + filled, D), which reads ``queue_filled``
        on the host (the loss itself does not)."""
        if not self.skip_unwritten:
            return torch.cat([self.lut, self.queue], 0)
        filled = int(self.queue_filled)
        if filled == 0:
            return self.lut.clone()
        return torch.cat([self.lut, self.queue[:filled]], 0)

    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Labels on the CPU (the trainer passes them so) keep the whole
        forward and update free of device-to-host syncs: every data-dependent
        decision (which samples are labeled, duplicate ids, queue writes) is
        taken on the host copy; the queue counters stay on the device."""
        host = self._validate(features, labels)
        # the buffers' dtype, at least float32: a .double() module computes in
        # float64, a float32 or bfloat16 one in float32, whatever the features
        dtype = torch.promote_types(self.lut.dtype, torch.float32)
        with torch.autocast(device_type=features.device.type, enabled=False):
            x = F.normalize(features.to(dtype), dim=1)
            loss = self._loss(x, host)
        if self.training:
            self._update(x.detach(), host)
        return loss

    def _logits(self, xl: torch.Tensor, unfilled: Optional[torch.Tensor]) -> torch.Tensor:
        """(n, L + Q) logits against [LUT; queue]; ``unfilled`` (the never
        written queue slots, given with ``skip_unwritten``) at -inf: they add
        exactly 0 to the partition function.  Both buffers are read through
        copies in ``xl``'s dtype: they are updated in place after this forward
        (and by any later one before a backward, e.g. two losses summed),
        while autograd keeps what it read."""
        lg = xl @ self.lut.to(xl.dtype, copy=True).t() / self.temperature
        if not self.queue_size:
            return lg
        queue = self.queue.to(xl.dtype, copy=True)
        lq = xl @ queue.t() / self.temperature
        if unfilled is not None:
            lq = lq.masked_fill(unfilled, float("-inf"))
        return torch.cat([lg, lq], 1)

    def _loss(self, x: torch.Tensor, host: torch.Tensor) -> torch.Tensor:
        rows = torch.nonzero(host >= 0).squeeze(1)
        if rows.numel() == 0:
            # No labeled sample: a zero that keeps the graph connected.
            return x.sum() * 0.0
        if rows.numel() == host.numel():
            xl, yl_host = x, host
        else:
            xl, yl_host = x.index_select(0, _to(rows, x.device)), host[rows]
        yl = _to(yl_host, x.device)
        # queue slots never written (on the device: no sync), to leave out;
        # None without a queue or without skip_unwritten
        unfilled = None
        if self.queue_size and self.skip_unwritten:
            unfilled = torch.arange(self.queue_size, device=x.device) >= self.queue_filled
        logits = self._logits(xl, unfilled)  # (n, L + Q)
        C = self.num_labeled + self.queue_size
        if self.num_sampled is None or self.num_sampled >= C - 1:
            return F.cross_entropy(logits, yl)
        # Target + S negatives drawn uniformly without replacement, per sample,
        # among the other entries; with skip_unwritten, the unwritten queue
        # slots (logit -inf, i.e. left out) come after every written one; the
        # target never comes.
        n, S = xl.shape[0], self.num_sampled
        scores = torch.rand(n, C, device=x.device)
        if unfilled is not None:
            scores[:, self.num_labeled:].masked_fill_(unfilled, -2.0)
        scores.scatter_(1, yl[:, None], -3.0)
        neg = scores.topk(S, dim=1).indices  # (n, S)
        cols = torch.cat([yl[:, None], neg], 1)  # target first
        sub = logits.gather(1, cols)
        return F.cross_entropy(sub, torch.zeros(n, dtype=torch.long, device=x.device))

    # ------------------------------------------------------------------ update
    @torch.no_grad()
    def _update(self, x: torch.Tensor, host: torch.Tensor) -> None:
        if _dist_world() > 1:
            x, host = _gather_batches(x, host)
        x = x.to(self.lut.dtype)
        self._update_lut(x, host)
        unl = torch.nonzero(host < 0).squeeze(1)
        if self.queue_size and unl.numel():
            self._update_queue(x.index_select(0, _to(unl, x.device)))

    def _update_lut(self, x: torch.Tensor, host: torch.Tensor) -> None:
        rows = torch.nonzero(host >= 0).squeeze(1)
        if rows.numel() == 0:
            return
        y = host[rows]
        # occurrence rank of each sample among the samples with its label (on the host)
        n = y.shape[0]
        order = torch.argsort(y, stable=True)
        ys = y[order]
        start = torch.ones(n, dtype=torch.bool)
        start[1:] = ys[1:] != ys[:-1]
        pos = torch.arange(n)
        group_start = torch.cummax(torch.where(start, pos, torch.zeros_like(pos)), 0).values
        occ = torch.empty_like(pos)
        occ[order] = pos - group_start
        m = self.momentum
        for r in range(int(occ.max()) + 1):
            sel = occ == r  # unique labels within a round, in batch order
            xr = x.index_select(0, _to(rows[sel], x.device))
            yr = _to(y[sel], x.device)
            self.lut[yr] = F.normalize(m * self.lut[yr] + (1.0 - m) * xr, dim=1)

    def _update_queue(self, u: torch.Tensor) -> None:
        """Sequential write of ``u`` at ``queue_ptr`` (wrapping); the counters
        are updated on the device."""
        Q = self.queue_size
        k = u.shape[0]
        keep = min(k, Q)
        first = k - keep  # samples [first, k) survive a sequential write
        idx = (self.queue_ptr + torch.arange(first, k, device=u.device)) % Q
        self.queue[idx] = u[first:]
        self.queue_ptr.copy_((self.queue_ptr + k) % Q)
        self.queue_filled.copy_(torch.clamp(self.queue_filled + k, max=Q))

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        for name, shape in (("lut", tuple(self.lut.shape)), ("queue", tuple(self.queue.shape))):
            if name in state_dict and tuple(state_dict[name].shape) != shape:
                raise ValueError(f"state_dict[{name!r}]: expected shape {shape}, got {tuple(state_dict[name].shape)}")
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def buffers_checksum(self) -> Tuple[float, float, int, int]:
        """(sum of lut, sum of queue, ptr, filled) — handy to compare ranks."""
        return (float(self.lut.double().sum()), float(self.queue.double().sum()),
                int(self.queue_ptr), int(self.queue_filled))

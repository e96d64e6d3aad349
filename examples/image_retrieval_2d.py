"""PersonVLAD in a 2-D image retrieval model, trained for a few seconds on CPU.

Synthetic task: each "place" is a random arrangement of coloured blobs; views
of a place are shifted, rescaled and noisy.  A small CNN + PersonVLAD (3 parts,
8 clusters) is trained with a contrastive (InfoNCE) loss on pairs of views and
evaluated by recall@1 on held-out places, before and after training.

    python examples/image_retrieval_2d.py [--steps 60]
"""
import argparse
import time

import torch
import torch.nn.functional as F

from personvlad.nn import PersonVLAD


def make_place(g: torch.Generator, size=32, blobs=5):
    img = torch.zeros(3, size, size)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    for _ in range(blobs):
        cy, cx = torch.randint(0, size, (2,), generator=g).tolist()
        r = float(torch.randint(3, 8, (1,), generator=g))
        colour = torch.rand(3, generator=g)
        mask = ((yy - cy) ** 2 + (xx - cx) ** 2) < r * r
        img[:, mask] = colour[:, None]
    return img


def view(img: torch.Tensor, g: torch.Generator):
    """A shifted, rescaled, noisy view of a place."""
    shift = torch.randint(-4, 5, (2,), generator=g).tolist()
    out = torch.roll(img, shifts=shift, dims=(1, 2))
    scale = 0.8 + 0.4 * float(torch.rand(1, generator=g))
    out = F.interpolate(out[None], scale_factor=scale, mode="bilinear", align_corners=False)
    out = F.interpolate(out, size=img.shape[1:], mode="bilinear", align_corners=False)[0]
    return (out + 0.1 * torch.randn(out.shape, generator=g)).clamp(0, 1)


class RetrievalNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.cnn = torch.nn.Sequential(
            torch.nn.Conv2d(3, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(32, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        )
        self.vlad = PersonVLAD(32, num_clusters=8, num_parts=3, alpha=10.0)

    def forward(self, x):
        return self.vlad(self.cnn(x))


@torch.no_grad()
def recall_at_1(net, places, g):
    q = torch.stack([view(p, g) for p in places])
    d = torch.stack([view(p, g) for p in places])
    sim = net(q) @ net(d).T
    return (sim.argmax(1) == torch.arange(len(places))).float().mean().item()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    train_places = [make_place(g) for _ in range(64)]
    test_places = [make_place(g) for _ in range(32)]
    net = RetrievalNet()
    with torch.no_grad():  # k-means init of the VLAD centers on local CNN features
        feats = net.cnn(torch.stack(train_places[:32]))
        net.vlad.init_centers(feats.permute(0, 2, 3, 1).reshape(-1, 32))
    before = recall_at_1(net, test_places, torch.Generator().manual_seed(1))
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    t0 = time.perf_counter()
    for step in range(args.steps):
        idx = torch.randint(0, len(train_places), (16,), generator=g)
        a = torch.stack([view(train_places[i], g) for i in idx])
        b = torch.stack([view(train_places[i], g) for i in idx])
        logits = net(a) @ net(b).T / 0.05
        same = (idx[:, None] == idx[None, :]).float()
        loss = -(F.log_softmax(logits, 1) * same / same.sum(1, keepdim=True)).sum(1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = recall_at_1(net, test_places, torch.Generator().manual_seed(1))
    print(f"2-D retrieval with PersonVLAD: recall@1 {before:.2f} -> {after:.2f} after {args.steps} steps "
          f"({time.perf_counter() - t0:.1f} s, descriptor {net.vlad.output_dim}-d)")
    return before, after


if __name__ == "__main__":
    main()

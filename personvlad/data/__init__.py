"""personvlad.data — dataset readers, synthetic data, clip sampling and loaders.

Readers (SPEC §5): :class:`MARS`, :class:`ILIDSVID`, :class:`PRID2011`,
:func:`build_dataset`.  Frames: :func:`read_clip`, :class:`FrameStats`.
Sampling: :func:`test_clip_indices`, :func:`train_clip_indices`,
:class:`IdentityBalancedSampler`.  JPEG loaders: :class:`TrainClipDataset`,
:class:`TestClipDataset`, :func:`build_train_loader`, :func:`build_test_loader`.
Shard fast path: :func:`pack_dataset`, :class:`ShardStore`,
:class:`ShardTrainLoader`, :class:`ShardTestLoader`.
Optional nvJPEG path: :mod:`personvlad.data.gpu_jpeg` (needs torchvision).
Synthetic data: :func:`personvlad.data.synth.generate`.  CLI: :mod:`personvlad.data.cli`
(``personvlad synth``, ``personvlad pack``).
"""
from .frames import FrameStats, decode_frame, parse_size, read_clip, read_frames
from .loader import TestClipDataset, TrainClipDataset, build_test_loader, build_train_loader
from .readers import ILIDSVID, MARS, PRID2011, VideoDataset, build_dataset, natural_sorted
from .sampling import IdentityBalancedSampler, test_clip_indices, train_clip_indices
from .shards import ShardStore, ShardTestLoader, ShardTrainLoader, pack_dataset

__all__ = [
    "MARS", "ILIDSVID", "PRID2011", "VideoDataset", "build_dataset", "natural_sorted",
    "FrameStats", "read_clip", "read_frames", "decode_frame", "parse_size",
    "test_clip_indices", "train_clip_indices", "IdentityBalancedSampler",
    "TrainClipDataset", "TestClipDataset", "build_train_loader", "build_test_loader",
    "pack_dataset", "ShardStore", "ShardTrainLoader", "ShardTestLoader",
]

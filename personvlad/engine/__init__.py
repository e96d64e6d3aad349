"""personvlad.engine — training (two-step OIM schedule, checkpoints, DDP) and feature extraction.

- :class:`TrainConfig` (YAML, dotted overrides), :func:`train`;
- :func:`extract_features` / :func:`extract_split` / :func:`describe_frames` / :func:`evaluate_model`;
- checkpoints: :func:`save_checkpoint` (atomic), :func:`load_checkpoint` (weights_only), :func:`find_latest`;
- how long a schedule takes: :mod:`personvlad.engine.estimate` (``estimate``: a probe run;
  ``project_schedule``: from a run's timings).
CLI: ``personvlad train`` / ``personvlad extract`` (module :mod:`personvlad.engine.cli`).
"""
from .checkpoint import find_latest, load_checkpoint, save_checkpoint
from .config import TrainConfig


def train(config, out_dir, resume=False, **kwargs):
    """See :func:`personvlad.engine.trainer.train`."""
    from .trainer import train as _train

    return _train(config, out_dir, resume=resume, **kwargs)


def __getattr__(name):
    if name in ("extract_features", "extract_split", "describe_frames", "evaluate_model",
                "load_model_from_checkpoint"):
        from . import extract

        return getattr(extract, name)
    raise AttributeError(name)


__all__ = ["TrainConfig", "train", "save_checkpoint", "load_checkpoint", "find_latest", "extract_features",
           "extract_split", "describe_frames", "evaluate_model", "load_model_from_checkpoint"]

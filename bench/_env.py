"""The one environment helper of the bench scripts (profile_op.py,
memcheck_driver.py): switches such as PERSONVLAD_CUDA_FWD set for one block.
The pytest suites use monkeypatch instead."""
from __future__ import annotations

import contextlib
import os
from typing import Dict, Iterator


@contextlib.contextmanager
def scoped_env(values: Dict[str, str]) -> Iterator[None]:
    """Sets the environment variables ``values`` (name -> value) for the
    block, then restores each to what it was (unset if it was unset)."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, old in saved.items():
            if old is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = old

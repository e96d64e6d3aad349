"""The examples run as tests (CPU, seconds) and learn something."""
import importlib.util
import os

ROOT = os.path.join(os.path.dirname(__file__), "..", "examples")


def _load(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, name + ".py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_image_retrieval_example_trains():
    before, after = _load("image_retrieval_2d").main(["--steps", "30"])
    assert 0.0 <= before <= 1.0
    assert after >= before and after >= 0.8


def test_video_action_example_learns():
    before, after = _load("video_action_recognition").main(["--steps", "40"])
    assert after > before + 0.2, (before, after)

"""`make demo` in its reduced CI form (DEMO_FAST=1): the same code path as the
full demo, with a smaller training budget.  Its table must be sane: finite
metrics in [0, 1], and the trained PersonVLAD above the untrained model."""
import json
import math
import os

import pytest

from personvlad.cli import main as cli_main


@pytest.mark.slow
def test_demo_fast_pipeline(tmp_path, capsys):
    out = tmp_path / "demo"
    assert cli_main(["demo", "--fast", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "protocol 'standard'" in text and "protocol 'mars'" in text
    summary = json.loads((out / "summary.json").read_text())
    assert summary["fast"] is True
    res = summary["results"]
    assert set(res) == {"PersonVLAD (untrained)", "PersonVLAD (trained)", "3D ConvNet + GP avg (trained)"}
    for name, protocols in res.items():
        for protocol, row in protocols.items():
            for key, v in row.items():
                assert math.isfinite(v) and 0.0 <= v <= 1.0, (name, protocol, key, v)
            assert row["rank1"] <= row["rank5"] <= row["rank20"]
    trained = res["PersonVLAD (trained)"]["standard"]
    untrained = res["PersonVLAD (untrained)"]["standard"]
    assert trained["rank1"] > untrained["rank1"], (trained, untrained)
    assert trained["mAP"] > untrained["mAP"], (trained, untrained)
    for pic in summary["pictures"]:
        assert os.path.getsize(pic) > 1000, pic
    # each budget and seed trains in its own folder: a later full or
    # other-seed demo in the same --out never resumes this run
    assert sorted(os.listdir(out / "runs")) == ["avg-fast-seed0", "vlad-fast-seed0"]

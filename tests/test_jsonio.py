"""Every JSON file we write is strict JSON: a non-finite number is null, never NaN/Infinity."""

from __future__ import annotations

import json
import math

from cxrfl_ray.jsonio import dumps, write_json


def _strict_load(text: str):
    def refuse(token: str):
        raise ValueError(f"non-standard JSON token {token}")

    return json.loads(text, parse_constant=refuse)


def test_non_finite_numbers_become_null_at_any_depth_and_finite_ones_stay(tmp_path):
    value = {"best": float("nan"), "final": {"a": [1.5, float("inf"), -float("inf")], "n": 3},
             "rounds": (0, 1), "name": "NaN", "ok": True, "none": None}
    path = write_json(tmp_path / "summary.json", value)
    text = path.read_text()
    assert "NaN," not in text and "Infinity" not in text
    loaded = _strict_load(text)
    assert loaded == {"best": None, "final": {"a": [1.5, None, None], "n": 3}, "rounds": [0, 1],
                      "name": "NaN", "ok": True, "none": None}
    assert text.endswith("\n")


def test_plain_json_dumps_would_have_written_invalid_json():
    # the failure this module exists for: json.dumps writes a token other parsers refuse
    assert json.dumps({"x": float("nan")}) == '{"x": NaN}'
    assert dumps({"x": float("nan")}) == '{"x": null}'
    assert _strict_load(dumps([math.pi])) == [math.pi]

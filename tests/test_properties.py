"""Property tests (hypothesis): the config parser and the RLE mask encoding, over inputs nobody wrote down."""

import json
import math

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from uadkit.config import load_config, parse_override
from uadkit.errors import UadkitError
from uadkit.inference.result import decode_rle, encode_rle

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# text a shell can pass in one argument (no NUL); newlines included
ARG_TEXT = st.text(st.characters(exclude_characters="\x00", exclude_categories=("Cs",)), max_size=40)


@SETTINGS
@given(arrays(np.uint8, st.tuples(st.integers(0, 40), st.integers(0, 40)), elements=st.integers(0, 1)))
def test_rle_round_trip(mask):
    rle = encode_rle(mask)
    again = json.loads(json.dumps(rle))  # the JSON form is what gets saved
    assert rle["size"] == list(mask.shape)
    assert sum(rle["counts"]) == mask.size and all(c >= 0 for c in rle["counts"])
    assert all(c > 0 for c in rle["counts"][1:])  # only the leading zeros-run may be empty
    out = decode_rle(again)
    assert out.dtype == np.uint8 and out.shape == mask.shape and (out == mask).all()


@SETTINGS
@given(arrays(np.bool_, st.tuples(st.integers(1, 30), st.integers(1, 30))))
def test_rle_of_bool_and_of_any_nonzero_values(mask):
    assert (decode_rle(encode_rle(mask)) == mask).all()
    assert (decode_rle(encode_rle(mask.astype(np.uint8) * 255)) == mask).all()


@SETTINGS
@given(st.tuples(st.integers(0, 20), st.integers(0, 20)), st.lists(st.integers(-3, 50), max_size=12))
def test_rle_decode_refuses_inconsistent_counts(size, counts):
    rle = {"size": list(size), "counts": counts}
    if all(c >= 0 for c in counts) and sum(counts) == size[0] * size[1]:
        assert decode_rle(rle).shape == size
    else:
        with pytest.raises(ValueError, match="RLE"):
            decode_rle(rle)


@SETTINGS
@given(ARG_TEXT)
def test_path_overrides_are_taken_verbatim(text):
    parts, value = parse_override(f"Predict.input={text}")
    assert parts == ["Predict", "input"]
    if text.strip() in ("", "null", "~", "None"):
        assert value is None
    elif len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"" and value != text:
        assert value == yaml.safe_load(text)  # quoted: the quotes go
    else:
        assert value == text


JSONISH = st.recursive(st.none() | st.booleans() | st.integers(-10**6, 10**6)
                       | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=10),
                       lambda inner: st.lists(inner, max_size=4), max_leaves=8)


@SETTINGS
@given(JSONISH)
def test_typed_overrides_round_trip_through_yaml(value):
    text = yaml.safe_dump(value, default_flow_style=True, width=10**6).strip()
    if text.endswith("\n..."):
        text = text[:-4].strip()
    parts, parsed = parse_override(f"Train.epochs_iters={text}")
    assert parts == ["Train", "epochs_iters"]
    if isinstance(value, float) and not math.isfinite(value):
        return
    assert parsed == value


PREDICT_KEYS = ["input", "model_dir", "batch_size", "threshold", "save_images", "run_mode", "num_workers",
                "max_pixels", "on_error"]


@SETTINGS
@given(st.sampled_from(PREDICT_KEYS), ARG_TEXT)
def test_any_predict_override_is_a_config_or_a_one_line_error(key, text):
    try:
        cfg = load_config("configs/STFPM.yaml", [f"Predict.{key}={text}"])
    except UadkitError as e:
        assert "\n" not in str(e).strip() or "YAML" in str(e)  # YAML's own message quotes the text
        return
    p = cfg["Predict"]
    assert p["on_error"] in ("skip", "stop") and p["max_pixels"] >= 1 and p["batch_size"] >= 1
    assert p["threshold"] is None or 0 < p["threshold"] < 1
    assert p["input"] is None or isinstance(p["input"], (str, list))


@SETTINGS
@given(st.lists(st.tuples(st.sampled_from(["Global", "Predict", "Train", "Model", "Nope"]),
                          st.text("abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=12), ARG_TEXT), max_size=4))
def test_random_overrides_never_crash_the_parser(items):
    try:
        load_config(None, [f"{s}.{k}={v}" for s, k, v in items])
    except UadkitError:
        pass

"""Hostile click files: every input either parses or raises ClickFileError naming the file.

The named cases are the ones that crashed with a bare exception or were silently misread (they go
through real files). The fuzz test mutates valid files of each format (nnunet_guide JSON, 3D Slicer
markups, MONAI Label style) with a seeded generator, 10,000 inputs per format, and parses the bytes
in-process exactly as the file loader does (``parse_click_bytes``), then resolves the labels.
"""
import json
import math
import random

import pytest

from nnunet_guide.inference import click_io
from nnunet_guide.inference.click_io import (ClickFileError, ClickSpec, as_specs, check_labels, load_clicks,
                                             parse_click_bytes)
from nnunet_guide.settings import GuidedTarget, GuideSettings, build_layout

LAYOUT = build_layout(1, [GuidedTarget("liver", (1,)), GuidedTarget("tumor", (2,))], GuideSettings(), ["CT"])
HUGE = 10 ** 400


def load_and_check(path):
    """What a prediction run does with a click file before reading any image."""
    clicks = load_clicks(path)
    check_labels(clicks, LAYOUT)
    return clicks


def write(tmp_path, name, content):
    p = tmp_path / name
    p.write_bytes(content if isinstance(content, bytes) else json.dumps(content).encode())
    return str(p)


def slicer(name, position=(1.0, 2.0, 3.0), **cp):
    return {"markups": [{"type": "Fiducial", "coordinateSystem": "LPS", "name": name,
                         "controlPoints": [{"label": "F-1", "position": list(position), **cp}]}]}


def deep(n):
    v = [1, 2, 3]
    for _ in range(n):
        v = [v]
    return v


HOSTILE_FILES = [
    ("huge_point.json", {"c": [{"point": [HUGE, 2, 3], "label": "tumor"}]}),
    ("huge_size.json", {"c": [{"point": [1, 2, 3], "label": "tumor", "size_mm": HUGE}]}),
    ("huge_monai.json", {"tumor": [[1, HUGE, 3]]}),
    ("huge_slicer.mrk.json", slicer("tumor", (1, 2, HUGE))),
    ("latin1.json", '{"c": [{"point": [1, 2, 3], "label": "tum\u00f6r"}]}'.encode("latin-1")),
    ("deep.json", b"[" * 100000 + b"]" * 100000),
    ("deep_value.json", {"c": [{"point": deep(500), "label": "tumor"}]}),
    ("deep_monai.json", {"c": {"tumor": deep(500)}}),
    ("superscript_two.json", {"\u00b2": [[1, 2, 3]]}),
    ("superscript_two_own.json", {"c": [{"point": [1, 2, 3], "label": "\u00b2"}]}),
    ("superscript_two_slicer.mrk.json", slicer("\u00b2")),
    ("list_name.mrk.json", slicer(["tumor"])),
    ("dict_description.mrk.json", slicer("tumor", description={"a": 1})),
    ("number_name.mrk.json", slicer(2.9)),           # used to become label 2 silently
    ("decimal_name.mrk.json", slicer("2.9")),        # a name, not the value 2: no class of that name
    ("system_list.mrk.json", {"markups": [{"coordinateSystem": ["LPS"], "name": "tumor", "controlPoints": []}]}),
    ("nan.json", b'{"c": [{"point": [NaN, 2, 3], "label": "tumor"}]}'),
    ("too_many_digits.json", b'{"c": [{"point": [' + b"1" * 5000 + b', 2, 3], "label": "tumor"}]}'),
]


@pytest.mark.parametrize("name,content", HOSTILE_FILES, ids=[n for n, _ in HOSTILE_FILES])
def test_hostile_click_files_raise_click_file_error_naming_the_file(tmp_path, name, content):
    path = write(tmp_path, name, content)
    with pytest.raises(ClickFileError) as e:
        load_and_check(path)
    assert path in str(e.value), str(e.value)


def test_slicer_names_are_names_and_decimal_text_is_a_value(tmp_path):
    assert load_and_check(write(tmp_path, "c.mrk.json", slicer("2")))["c"][0].label == 2
    assert load_and_check(write(tmp_path, "c.mrk.json", slicer("tumor")))["c"][0].label == "tumor"


def test_nan_and_bad_values_through_the_python_api():
    for point in ((math.nan, 1.0, 2.0), (1.0, math.inf, 2.0), (HUGE, 1, 2), (1, 2)[:1]):
        with pytest.raises(ValueError, match="a point must be a list of 2 or 3 finite numbers"):
            ClickSpec(point, "tumor")
    with pytest.raises(ValueError, match="'label' must be a class name or an integer label value, got 2.9"):
        ClickSpec((1.0, 2.0, 3.0), 2.9)
    with pytest.raises(ValueError, match="'positive' must be true or false"):
        ClickSpec((1.0, 2.0, 3.0), "tumor", "yes")
    with pytest.raises(ValueError, match=r"clicks, case 'c', click 0: a point must be .* got \[nan, 1, 2\]"):
        as_specs([{"point": [math.nan, 1, 2], "label": "tumor"}], "clicks", "c")


def test_click_limit_per_case(tmp_path):
    n = click_io.MAX_CLICKS_PER_CASE
    assert n == 10_000
    ok = write(tmp_path, "ok.json", {"c": [{"point": [1, 2, 3], "label": "tumor"}] * n})
    assert len(load_and_check(ok)["c"]) == n
    for name, content in [("own.json", {"c": [{"point": [1, 2, 3], "label": "tumor"}] * (n + 1)}),
                          ("monai.json", {"tumor": [[1, 2, 3]] * n, "background": [[1, 2, 3]]}),
                          ("c.mrk.json", {"markups": [{"name": "tumor", "controlPoints": [{"position": [1, 2, 3]}]
                                                       * (n + 1)}]})]:
        path = write(tmp_path, name, content)
        with pytest.raises(ClickFileError, match=rf"{n + 1} clicks; at most {n} clicks per case"):
            load_clicks(path)
    with pytest.raises(ValueError, match="at most 10000 clicks per case"):
        as_specs([ClickSpec((1.0, 2.0, 3.0), "tumor")] * (n + 1), "clicks", "c")


# ---- fuzz -----------------------------------------------------------------------------------
SEEDS = {
    "own": ("clicks.json", [{"case_1": [{"point": [1.5, 2, 3], "label": "tumor", "positive": True, "space": "voxel",
                                        "size_mm": 5}, {"point": [4, 5, 6], "label": 2, "positive": False}],
                            "case_2": [{"point": [7, 8], "label": "liver", "space": "array"}]}]),
    "slicer": ("case_1.mrk.json", [{"@schema": "markups-schema-v1.0.3", "markups": [
        {"type": "Fiducial", "coordinateSystem": "RAS", "name": "tumor",
         "controlPoints": [{"id": "1", "label": "F-1", "description": "", "position": [1.0, 2.0, 3.0]},
                           {"id": "2", "label": "F-2-", "description": "negative", "position": [4.0, 5.0, 6.0]}]},
        {"type": "Fiducial", "name": "background", "controlPoints": [{"label": "B", "position": [0.0, 1.0, 2.0]}]},
        {"type": "Fiducial", "name": "", "controlPoints": [{"description": "liver", "position": [3, 3, 3]}]}]}]),
    # one case (case id from the file name) and several cases keyed by case id
    "monai": ("case_1.json", [{"tumor": [[1, 2, 3], [4, 5, 6]], "background": [[1, 1, 1]], "1": [[2, 2, 2]]},
                              {"case_1": {"tumor": [[1, 2, 3]], "background": []}, "case_2": {"2": [[3.5, 2, 1]]}}]),
}
HOSTILE = [HUGE, -HUGE, math.nan, math.inf, -math.inf, 1e308, -0.0, 0, 2, -1, 2.9, True, False, None, "", " ",
           "\u00b2", "\u0663", "2.9", "2", "tumor", "liver", "background", "negative", "positive", "RAS", "LPS",
           "voxel", "physical", "array", [], {}, [[]], [1, 2], [1, 2, 3, 4], [1, "2", 3], "x" * 300,
           {"point": [1, 2, 3], "label": "tumor"}, {"position": [1, 2, 3]}, [[1, 2, 3]], deep(40)]
KEYS = ["point", "label", "positive", "space", "size_mm", "markups", "controlPoints", "position", "name",
        "description", "coordinateSystem", "background", "tumor", "case_1", "\u00b2", ""]


def _containers(obj, out):
    if isinstance(obj, (list, dict)):
        out.append(obj)
        for v in (obj.values() if isinstance(obj, dict) else obj):
            _containers(v, out)
    return out


HOSTILE_JSON = [json.dumps(v) if isinstance(v, (list, dict)) else None for v in HOSTILE]


def _hostile(rng):
    i = rng.randrange(len(HOSTILE))
    return HOSTILE[i] if HOSTILE_JSON[i] is None else json.loads(HOSTILE_JSON[i])   # a fresh copy


def mutate(rng, seed_json):
    obj = json.loads(seed_json)
    for _ in range(rng.randint(1, 3)):
        nodes = _containers(obj, [])
        node = rng.choice(nodes)
        op = rng.random()
        if isinstance(node, dict):
            if node and op < 0.6:
                node[rng.choice(list(node))] = _hostile(rng)
            elif node and op < 0.8:
                del node[rng.choice(list(node))]
            else:
                node[rng.choice(KEYS)] = _hostile(rng)
        else:
            if node and op < 0.6:
                node[rng.randrange(len(node))] = _hostile(rng)
            elif node and op < 0.75:
                del node[rng.randrange(len(node))]
            elif op < 0.9:
                node.append(_hostile(rng))
            else:
                node.extend(json.loads(json.dumps(node)) * rng.randint(1, 3))
    if rng.random() < 0.05:
        obj = rng.choice([[obj], {"case_9": obj}, _hostile(rng)])
    data = json.dumps(obj).encode()
    r = rng.random()
    if r < 0.03:
        data = data[:rng.randrange(len(data) + 1)]                          # truncated
    elif r < 0.06:
        i = rng.randrange(len(data) + 1)
        data = data[:i] + rng.choice([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x00", b"\xef\xbb\xbf"]) + data[i:]
    elif r < 0.08:
        i = rng.randrange(len(data))
        data = data[:i] + bytes([rng.randrange(256)]) + data[i + 1:]       # one random byte
    elif r < 0.09:
        n = rng.choice([100, 5000])
        data = b"[" * n + data + b"]" * n                                   # deep nesting
    return data


@pytest.mark.parametrize("fmt", sorted(SEEDS))
def test_fuzz_every_input_parses_or_names_the_file(tmp_path, fmt):
    rng = random.Random(1234 + sorted(SEEDS).index(fmt))
    name, seed_objs = SEEDS[fmt]
    path = str(tmp_path / "fuzz" / name)     # only named in messages: the bytes are parsed in-process
    seeds = [json.dumps(o) for o in seed_objs]
    for seed in seeds:                       # the seeds themselves are valid
        assert parse_click_bytes(seed.encode(), path)
    outcomes = {"parsed": 0, "refused": 0}
    for i in range(10_000):
        data = mutate(rng, seeds[i % len(seeds)])
        try:
            clicks = parse_click_bytes(data, path)
            check_labels(clicks, LAYOUT)
        except ClickFileError as e:
            assert path in str(e), f"input {i}: {data[:300]!r} -> {e}"
            outcomes["refused"] += 1
            continue
        except Exception as e:  # noqa: BLE001 - the point of the test
            pytest.fail(f"input {i} of {fmt}: {data[:300]!r} raised {type(e).__name__}: {str(e)[:300]}")
        for case, specs in clicks.items():
            assert isinstance(case, str)
            for s in specs:
                assert isinstance(s, ClickSpec) and all(math.isfinite(v) for v in s.point)
                assert isinstance(s.label, (str, int)) and not isinstance(s.label, bool)
        outcomes["parsed"] += 1
    assert outcomes["parsed"] > 300 and outcomes["refused"] > 300, outcomes   # both paths exercised

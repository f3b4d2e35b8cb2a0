"""Read user clicks from files and turn them into :class:`~nnunet_guide.core.clicks.Click` objects
in nnU-Net's preprocessed voxel space.

Two steps, kept apart so that a malformed file fails before any image is read:

1. :func:`load_clicks` parses a file (or a folder of files) into ``{case_id: [ClickSpec, ...]}``:
   normalised clicks that still live in the coordinates the user gave.
2. :func:`resolve_clicks` maps one case's specs through the image geometry and nnU-Net's
   preprocessing (see :mod:`nnunet_guide.core.coords`) and resolves labels against the model's
   :class:`~nnunet_guide.settings.ChannelLayout`.

Formats understood (detected from the content):

* **nnunet_guide JSON**: ``{"case_id": [{"point": [x, y, z], "label": "tumor" | 2,
  "positive": true, "space": "physical" | "voxel"}, ...], ...}``. ``space`` defaults to
  ``"physical"`` (mm, ITK/LPS as SimpleITK reports), ``"voxel"`` means the ITK index ``(i, j, k)``
  (as ``TransformPhysicalPointToIndex`` returns; the array index reversed). ``positive`` defaults
  to true. Case ids are input file names without ``_0000`` and the file ending.
* **3D Slicer markups** (``*.mrk.json``): every control point of every markup node is a click.
  The class is the node's ``name`` (e.g. a point list called ``tumor``), or the control point's
  ``description`` when that names a class. Points are RAS unless the node's ``coordinateSystem``
  says ``LPS``; RAS is converted to LPS by negating x and y. A control point is negative when its
  ``label`` ends with ``-`` or its ``description`` is ``negative``; a node named ``background``
  gives negative clicks for every guided class. The case id is the file name without
  ``.mrk.json`` (or the folder name, for ``case_id/*.mrk.json``).
* **MONAI Label style**: ``{"tumor": [[x, y, z], ...], "background": [[x, y, z], ...]}`` for one
  case (case id from the file name) or ``{"case_id": {"tumor": [...], ...}}`` for several.
  Points are voxel indices in ITK order ``(i, j, k)``, as MONAI Label sends them.
  ``background`` clicks are negative clicks for every guided class.

``load_clicks`` on a folder reads every ``*.json`` in it (and ``case_id/*.mrk.json``) and merges
the cases; a case given twice is an error.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from numbers import Real
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from ..core.clicks import Click
from ..core.encoding import OBJECT_SIGMA_PER_DIAMETER
from ..core.coords import (CoordinateError, ImageGeometry, PreprocessedGeometry, itk_index_to_array,
                           orientation_code, original_geometry, raw_inside)
from ..settings import ChannelLayout, GuideSettingsError

SPACES = ("physical", "voxel", "array")  # array: (z, y, x) index of the array nnU-Net's reader returns
BACKGROUND = "background"
_OWN_KEYS = {"point", "label", "positive", "space", "size_mm"}


class ClickFileError(ValueError):
    """A click file or a click that cannot be used; the message names the file, case and value."""


@dataclass(frozen=True)
class ClickSpec:
    """One click as the user gave it, before mapping into the image.

    Attributes:
        point: coordinates in ``space``: physical LPS mm ``(x, y, z)``, or the ITK voxel index
            ``(i, j, k)`` (continuous values allowed). 2 coordinates for 2D images.
        label: class name or label value as in dataset.json, or ``"background"`` (a negative
            click for every guided class).
        positive: True = "this is the class", False = "this is not the class".
        space: ``"physical"``, ``"voxel"``, or ``"array"`` (the ``(z, y, x)`` index of the array
            nnU-Net's reader returns, e.g. a position found in a label map read the same way).
        size_mm: optional object diameter (mm) for models with the ``object_gaussian`` encoding,
            whose guide is sized by the object (sigma = 0.37 x diameter, as the original work's
            users dragged an ellipse); other encodings ignore it.
        source: where the click came from (file and position), for error messages.
    """
    point: Tuple[float, ...]
    label: Union[str, int]
    positive: bool = True
    space: str = "physical"
    source: str = ""
    size_mm: Optional[float] = None

    def to_dict(self) -> dict:
        d = {"point": list(self.point), "label": self.label, "positive": self.positive, "space": self.space}
        if self.size_mm is not None:
            d["size_mm"] = self.size_mm
        return d


ClicksByCase = Dict[str, List[ClickSpec]]


# ---------------------------------------------------------------------------------------------
# parsing
# ---------------------------------------------------------------------------------------------

def _point(value, where: str) -> Tuple[float, ...]:
    if (not isinstance(value, (list, tuple)) or len(value) not in (2, 3)
            or not all(isinstance(v, Real) and not isinstance(v, bool) for v in value)
            or not all(np.isfinite(float(v)) for v in value)):
        raise ClickFileError(f"{where}: a point must be a list of 2 or 3 finite numbers, got {value!r}")
    return tuple(float(v) for v in value)


def _label(value, where: str) -> Union[str, int]:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ClickFileError(f"{where}: 'label' must be a class name or a label value (int), got {value!r}")
    if isinstance(value, str) and value.strip() == "":
        raise ClickFileError(f"{where}: 'label' is empty")
    return value


def _parse_own(obj: Mapping, source: str) -> ClicksByCase:
    out: ClicksByCase = {}
    for case, clicks in obj.items():
        if not isinstance(clicks, list):
            raise ClickFileError(f"{source}, case {case!r}: expected a list of clicks, got {type(clicks).__name__}")
        specs = []
        for n, c in enumerate(clicks):
            where = f"{source}, case {case!r}, click {n}"
            if not isinstance(c, dict):
                raise ClickFileError(f"{where}: expected an object with 'point' and 'label', got {c!r}")
            unknown = sorted(set(c) - _OWN_KEYS)
            if unknown:
                raise ClickFileError(f"{where}: unknown key(s) {unknown}; a click has {sorted(_OWN_KEYS)}")
            for key in ("point", "label"):
                if key not in c:
                    raise ClickFileError(f"{where}: missing {key!r}")
            positive = c.get("positive", True)
            if not isinstance(positive, bool):
                raise ClickFileError(f"{where}: 'positive' must be true or false, got {positive!r}")
            space = c.get("space", "physical")
            if space not in SPACES:
                raise ClickFileError(f"{where}: 'space' must be one of {SPACES}, got {space!r}")
            size = c.get("size_mm")
            if size is not None and not (isinstance(size, (int, float)) and not isinstance(size, bool)
                                         and math.isfinite(size) and size > 0):
                raise ClickFileError(f"{where}: 'size_mm' must be a positive number of mm, got {size!r}")
            specs.append(ClickSpec(_point(c["point"], where), _label(c["label"], where), positive, space, where,
                                   None if size is None else float(size)))
        out[str(case)] = specs
    return out


def _parse_monai_case(obj: Mapping, case: str, source: str) -> List[ClickSpec]:
    specs = []
    for label, points in obj.items():
        where = f"{source}, case {case!r}, label {label!r}"
        if not isinstance(points, list):
            raise ClickFileError(f"{where}: expected a list of [x, y, z] points, got {points!r}")
        lab = int(label) if isinstance(label, str) and label.isdigit() else label
        positive = label != BACKGROUND  # background points are negative clicks for every class
        for n, p in enumerate(points):
            at = f"{where}, point {n}"
            specs.append(ClickSpec(_point(p, at), lab, positive, "voxel", at))
    return specs


def _is_point_list(v) -> bool:
    return isinstance(v, list) and all(isinstance(p, (list, tuple)) for p in v)


def _parse_slicer(obj: Mapping, case: str, source: str) -> List[ClickSpec]:
    markups = obj.get("markups")
    if not isinstance(markups, list):
        raise ClickFileError(f"{source}: 'markups' must be a list of markup nodes")
    specs = []
    for m, node in enumerate(markups):
        where_node = f"{source}, case {case!r}, markup {m}"
        if not isinstance(node, dict):
            raise ClickFileError(f"{where_node}: expected an object, got {node!r}")
        system = str(node.get("coordinateSystem", "RAS")).upper()
        if system not in ("RAS", "LPS"):
            raise ClickFileError(f"{where_node}: coordinateSystem must be RAS or LPS, got {system!r}")
        name = node.get("name")
        points = node.get("controlPoints", [])
        if not isinstance(points, list):
            raise ClickFileError(f"{where_node}: 'controlPoints' must be a list")
        for n, cp in enumerate(points):
            where = f"{where_node} ({name!r}), control point {n}"
            if not isinstance(cp, dict) or "position" not in cp:
                raise ClickFileError(f"{where}: expected an object with 'position', got {cp!r}")
            pos = _point(cp["position"], where)
            if len(pos) != 3:
                raise ClickFileError(f"{where}: Slicer positions have 3 coordinates, got {pos}")
            if system == "RAS":
                pos = (-pos[0], -pos[1], pos[2])
            desc = str(cp.get("description", "") or "").strip()
            cp_label = str(cp.get("label", "") or "").strip()
            negative = cp_label.endswith("-") or desc.lower() == "negative"
            label = desc if desc and desc.lower() not in ("negative", "positive") else name
            if label is None or (isinstance(label, str) and not label.strip()):
                raise ClickFileError(
                    f"{where}: no class: name the markup node after the class (e.g. 'tumor') or put the "
                    f"class in the control point's description")
            if isinstance(label, str) and label.isdigit():
                label = int(label)
            if label == BACKGROUND:
                negative = True
            specs.append(ClickSpec(pos, label, not negative, "physical", where))
    return specs


def _strip_case_suffix(name: str) -> str:
    for suffix in (".mrk.json", ".json"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def parse_clicks(obj, source: str, case: Optional[str] = None) -> ClicksByCase:
    """Parse a loaded JSON object in any supported format (see module docstring).

    Args:
        obj: the JSON content.
        source: file name used in error messages.
        case: case id for per-case formats (Slicer markups, single-case MONAI style); defaults to
            the file name without ``.mrk.json`` / ``.json``.
    """
    if not isinstance(obj, dict):
        raise ClickFileError(f"{source}: expected a JSON object at the top level, got {type(obj).__name__}")
    case = case if case is not None else _strip_case_suffix(os.path.basename(source))
    if "markups" in obj:
        return {case: _parse_slicer(obj, case, source)}
    if not obj:
        return {}
    values = list(obj.values())
    if all(isinstance(v, list) and not v for v in values):
        return {}  # only empty lists: no clicks in either reading
    if all(_is_point_list(v) for v in values):
        return {case: _parse_monai_case(obj, case, source)}
    if all(isinstance(v, dict) for v in values):
        out = {}
        for k, v in obj.items():
            if not all(_is_point_list(p) for p in v.values()):
                raise ClickFileError(
                    f"{source}, case {k!r}: expected {{label: [[x, y, z], ...]}}, got {json.dumps(v)[:200]}")
            out[str(k)] = _parse_monai_case(v, str(k), source)
        return out
    if all(isinstance(v, list) for v in values):
        return _parse_own(obj, source)
    bad = next(k for k, v in obj.items() if not isinstance(v, (list, dict)))
    raise ClickFileError(
        f"{source}: cannot tell the click format: key {bad!r} holds {json.dumps(obj[bad])[:100]}; expected "
        f"case ids with lists of clicks, a MONAI-style {{label: [[x, y, z], ...]}} or a Slicer markups file")


def _read_json(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ClickFileError(f"{path}: not valid JSON ({e})") from e
    except OSError as e:
        raise ClickFileError(f"{path}: cannot read click file ({e.strerror})") from e


def _merge(into: ClicksByCase, new: ClicksByCase, source: str) -> None:
    for k, v in new.items():
        if k in into:
            raise ClickFileError(f"{source}: case {k!r} has clicks in more than one file; give each case once")
        into[k] = v


def load_clicks(path: str) -> ClicksByCase:
    """Read clicks from a file or a folder of files.

    Returns:
        ``{case_id: [ClickSpec, ...]}`` in the order the file lists them.
    Raises:
        ClickFileError naming the file, case and value for anything malformed.
    """
    if os.path.isdir(path):
        out: ClicksByCase = {}
        for name in sorted(os.listdir(path)):
            full = os.path.join(path, name)
            if os.path.isdir(full):
                per_case: List[ClickSpec] = []
                for sub in sorted(os.listdir(full)):
                    if sub.endswith(".json"):
                        got = parse_clicks(_read_json(os.path.join(full, sub)), os.path.join(full, sub), case=name)
                        per_case += got.get(name, [])
                        if set(got) - {name}:
                            raise ClickFileError(
                                f"{os.path.join(full, sub)}: files inside the case folder {name!r} may only hold "
                                f"clicks of that case, found {sorted(set(got) - {name})}")
                if per_case:
                    _merge(out, {name: per_case}, full)
            elif name.endswith(".json"):
                _merge(out, parse_clicks(_read_json(full), full), full)
        return out
    if not os.path.isfile(path):
        raise ClickFileError(f"click file {path} does not exist")
    return parse_clicks(_read_json(path), path)


def save_clicks(clicks: ClicksByCase, path: str) -> None:
    """Write clicks in the nnunet_guide JSON format (atomically)."""
    from ..settings import write_json_atomic
    write_json_atomic({k: [c.to_dict() for c in v] for k, v in clicks.items()}, path)


def check_cases(clicks: ClicksByCase, case_ids: Iterable[str], source: str = "clicks") -> None:
    """Refuse clicks for cases that are not among the inputs (typically a typo in a case id)."""
    known = set(case_ids)
    unknown = sorted(set(clicks) - known)
    if unknown:
        shown = sorted(known)[:10]
        raise ClickFileError(
            f"{source}: case id(s) {unknown} are not in the input (case ids are input file names without "
            f"'_0000' and the file ending; the input has {len(known)} case(s), e.g. {shown})")


# ---------------------------------------------------------------------------------------------
# resolution into preprocessed space
# ---------------------------------------------------------------------------------------------

def check_labels(clicks: ClicksByCase, layout: ChannelLayout) -> None:
    """Resolve every label against the layout now, so an unknown label fails before predicting."""
    for case, specs in clicks.items():
        for s in specs:
            click_targets(s, layout, case)


def click_targets(spec: ClickSpec, layout: ChannelLayout, case: str) -> List[Tuple[int, bool]]:
    """(target index, positive) pairs a click stands for: one, or one negative per guided class
    for ``background``. Raises ClickFileError for unknown labels or missing negative channels."""
    if layout.guide is None or not layout.targets:
        raise ClickFileError(f"{spec.source}: the model has no guide channels; it cannot take clicks")
    if spec.label == BACKGROUND:
        targets = [(t, False) for t in range(len(layout.targets))]
    else:
        try:
            targets = [(layout.target_index(spec.label), spec.positive)]
        except GuideSettingsError as e:
            raise ClickFileError(f"{spec.source}: {e}") from e
    if any(not pos for _, pos in targets) and not layout.guide.negatives:
        raise ClickFileError(
            f"{spec.source}: negative click (label {spec.label!r}) but this model was trained without negative "
            f"guide channels")
    return targets


def spec_to_raw(spec: ClickSpec, geometry: Optional[ImageGeometry], raw_shape: Sequence[int], case: str,
                file_geometry: Optional[ImageGeometry] = None) -> np.ndarray:
    """Raw array index (z, y, x) of a click; raises if it lies outside the image.

    Args:
        geometry: the image geometry as nnU-Net's reader returned it (needed for physical clicks).
        raw_shape: spatial shape of the raw array (z, y, x).
        file_geometry: the file's own grid when the reader reoriented it
            (``SimpleITKIOWithReorient``): voxel clicks are ITK indices of the file as SimpleITK
            opens it, so they go through physical space into the reoriented array.
    """
    n_img = len(raw_shape) if geometry is None else geometry.ndim
    if len(spec.point) != n_img and not (len(spec.point) == 2 and n_img == 3 and raw_shape[0] == 1):
        raise ClickFileError(
            f"{spec.source}: point {list(spec.point)} has {len(spec.point)} coordinates, the image of case "
            f"{case!r} has {n_img} dimensions")
    try:
        if spec.space == "physical":
            if geometry is None:
                raise ClickFileError(f"{spec.source}: physical click but no image geometry for case {case!r}")
            raw = itk_index_to_array(geometry.physical_to_index(spec.point), len(raw_shape))
        elif spec.space == "array":
            raw = np.asarray(spec.point, float)
            if raw.shape != (len(raw_shape),):
                raise ClickFileError(f"{spec.source}: array index {list(spec.point)} needs {len(raw_shape)} "
                                     f"coordinates (z, y, x)")
        elif file_geometry is not None:
            raw = itk_index_to_array(geometry.physical_to_index(file_geometry.index_to_physical(spec.point)),
                                     len(raw_shape))
        else:
            raw = itk_index_to_array(spec.point, len(raw_shape))
    except CoordinateError as e:
        raise ClickFileError(f"{spec.source}: {e}") from e
    if not raw_inside(raw[None], raw_shape)[0]:
        index, size = raw[::-1], raw_shape[::-1]
        if file_geometry is not None:  # report in the file's own grid, as the user sees it
            index, size = file_geometry.physical_to_index(geometry.index_to_physical(index)), file_geometry.size
        extent = " x ".join(str(s) for s in size)
        where = {"physical": "mm (LPS)", "voxel": "(ITK voxel index i, j, k)",
                 "array": "(array index z, y, x)"}[spec.space]
        raise ClickFileError(
            f"{spec.source}: click at {list(spec.point)} {where} lies outside the image of case {case!r} "
            f"(voxel index {np.round(index, 2).tolist()} in i, j, k; image size {extent} voxels)")
    return raw


def object_sigma(size_mm: Optional[float], properties: Mapping, pre: PreprocessedGeometry
                 ) -> Optional[Tuple[float, ...]]:
    """Per-axis sigma (preprocessed voxels) of an ``object_gaussian`` guide for an object of
    diameter ``size_mm`` (None: no size given)."""
    if size_mm is None:
        return None
    raw_mm = np.asarray(properties["spacing"], float)[list(pre.transpose_forward)]
    voxel_mm = raw_mm * pre.preprocessed_voxel_size  # mm per preprocessed voxel, per preprocessed axis
    return tuple(float(v) for v in OBJECT_SIGMA_PER_DIAMETER * float(size_mm) / voxel_mm)


def resolve_clicks(specs: Sequence[ClickSpec], layout: ChannelLayout, case: str, properties: Mapping,
                   transpose_forward: Sequence[int], preprocessed_shape: Sequence[int]) -> List[Click]:
    """Map one case's clicks into nnU-Net's preprocessed voxel space.

    Args:
        specs: the case's clicks as read from file.
        layout: the model's channel layout (labels are resolved against its targets).
        properties: the properties nnU-Net's preprocessing returned for this case.
        transpose_forward: the plans' ``transpose_forward``.
        preprocessed_shape: spatial shape of the preprocessed array (``data.shape[1:]``).
    Returns:
        Clicks with ``position`` in continuous preprocessed voxel coordinates (array axis order of
        the preprocessed data) and ``target`` an index into ``layout.targets``.
    """
    if not specs:
        return []
    pre = PreprocessedGeometry.from_properties(properties, transpose_forward, preprocessed_shape)
    geometry = file_geometry = None
    reoriented = properties.get("sitk_stuff", {}).get("original_orientation")
    if any(s.space == "physical" for s in specs) or reoriented:
        try:
            geometry = ImageGeometry.from_properties(properties, pre.raw_shape)
            if reoriented and geometry.ndim == 3 and orientation_code(geometry) != str(reoriented).upper():
                file_geometry = original_geometry(geometry, reoriented)
        except CoordinateError as e:
            raise ClickFileError(f"case {case!r}: {e}") from e
    clicks: List[Click] = []
    for s in specs:
        targets = click_targets(s, layout, case)
        raw = spec_to_raw(s, geometry, pre.raw_shape, case, file_geometry)
        pos = tuple(float(v) for v in pre.raw_to_preprocessed(raw))
        sigma = object_sigma(s.size_mm, properties, pre)
        for t, positive in targets:
            clicks.append(Click(t, pos, positive, sigma))
    return clicks


def as_specs(clicks, source: str = "clicks", case: str = "case") -> List[ClickSpec]:
    """One case's clicks given through the Python API: ``ClickSpec`` objects or dicts of the
    nnunet_guide JSON format (``{"point", "label", "positive", "space"}``)."""
    out: List[ClickSpec] = []
    if clicks is None:
        return out
    if isinstance(clicks, (dict, ClickSpec)):
        raise ClickFileError(f"{source}: expected a list of clicks for case {case!r}, got one {type(clicks).__name__}")
    for n, c in enumerate(clicks):
        if isinstance(c, ClickSpec):
            out.append(c if c.source else ClickSpec(c.point, c.label, c.positive, c.space,
                                                    f"{source}, case {case!r}, click {n}", c.size_mm))
            if c.space not in SPACES:
                raise ClickFileError(f"{source}, case {case!r}, click {n}: 'space' must be one of {SPACES}, "
                                     f"got {c.space!r}")
        else:
            parsed = _parse_own({case: [c]}, source)[case][0]
            out.append(ClickSpec(parsed.point, parsed.label, parsed.positive, parsed.space,
                                 f"{source}, case {case!r}, click {n}", parsed.size_mm))
    return out


def clicks_argument(clicks) -> ClicksByCase:
    """Normalise the ``clicks`` argument of the predictor: None, a click file or folder, or a dict
    ``{case_id: [ClickSpec | dict, ...]}``."""
    if clicks is None:
        return {}
    if isinstance(clicks, (str, os.PathLike)):
        return load_clicks(os.fspath(clicks))
    if isinstance(clicks, Mapping):
        return {str(k): as_specs(v, "clicks argument", str(k)) for k, v in clicks.items()}
    raise ClickFileError(f"clicks must be a file name or a dict {{case_id: [click, ...]}}, got {type(clicks).__name__}")

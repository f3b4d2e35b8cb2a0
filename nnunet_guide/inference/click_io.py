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

Limits: files must be UTF-8 JSON; a case may have at most :data:`MAX_CLICKS_PER_CASE` (10,000)
clicks (more is refused with a clear error before anything is resolved: an interactive session
needs tens, and 200,000 took over half a minute to read and resolve). Anything malformed raises
:class:`ClickFileError` naming the file, case and value.
"""
from __future__ import annotations

import json
import math
import os
import reprlib
from dataclasses import dataclass
from numbers import Real
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from ..core.clicks import Click
from ..core.encoding import OBJECT_SIGMA_PER_DIAMETER
from ..core.coords import (CoordinateError, ImageGeometry, PreprocessedGeometry, itk_index_to_array,
                           orientation_code, original_geometry, raw_inside)
from ..settings import ChannelLayout, GuideSettingsError, label_value

#: most clicks one case may have (per file format, and in total over a case folder)
MAX_CLICKS_PER_CASE = 10_000

SPACES = ("physical", "voxel", "array")  # array: (z, y, x) index of the array nnU-Net's reader returns
BACKGROUND = "background"
_OWN_KEYS = {"point", "label", "positive", "space", "size_mm"}


class ClickFileError(ValueError):
    """A click file or a click that cannot be used; the message names the file, case and value."""


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxlist, _REPR.maxdict, _REPR.maxstring, _REPR.maxother, _REPR.maxlong = 3, 6, 6, 60, 60, 40


def _show(value) -> str:
    """A short repr for error messages (safe for huge numbers and deeply nested values)."""
    try:
        return _REPR.repr(value)
    except Exception:  # noqa: BLE001 - only for a message
        return f"<{type(value).__name__}>"


def _check_count(n: int, where: str) -> None:
    if n > MAX_CLICKS_PER_CASE:
        raise ClickFileError(f"{where}: {n} clicks; at most {MAX_CLICKS_PER_CASE} clicks per case are accepted "
                             f"(nnunet_guide.inference.click_io.MAX_CLICKS_PER_CASE)")


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

    def __post_init__(self):
        """Checked and normalised on construction, also when built through the Python API:
        raises ClickFileError (a ValueError) naming ``source`` for NaN/inf or huge coordinates,
        a label that is neither a name nor an integer, a non-bool ``positive`` and so on."""
        where = self.source or "click"
        object.__setattr__(self, "point", _point(self.point, where))
        object.__setattr__(self, "label", _label(self.label, where))
        if not isinstance(self.positive, (bool, np.bool_)):
            raise ClickFileError(f"{where}: 'positive' must be true or false, got {_show(self.positive)}")
        object.__setattr__(self, "positive", bool(self.positive))
        if not isinstance(self.space, str) or self.space not in SPACES:
            raise ClickFileError(f"{where}: 'space' must be one of {SPACES}, got {_show(self.space)}")
        object.__setattr__(self, "size_mm", _size_mm(self.size_mm, where))

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
    if isinstance(value, np.ndarray) and value.ndim == 1:
        value = value.tolist()
    bad = ClickFileError(f"{where}: a point must be a list of 2 or 3 finite numbers, got {_show(value)}")
    if not isinstance(value, (list, tuple)) or len(value) not in (2, 3):
        raise bad
    out = []
    for v in value:
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, Real):
            raise bad
        try:
            f = float(v)
        except (OverflowError, ValueError, TypeError):  # e.g. a 400-digit integer
            raise bad from None
        if not math.isfinite(f):
            raise bad
        out.append(f)
    return tuple(out)


def _label(value, where: str) -> Union[str, int]:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (str, int, np.integer)):
        raise ClickFileError(f"{where}: 'label' must be a class name or an integer label value, got {_show(value)}")
    if isinstance(value, str) and value.strip() == "":
        raise ClickFileError(f"{where}: 'label' is empty")
    return int(value) if isinstance(value, np.integer) else value


def _size_mm(size, where: str) -> Optional[float]:
    if size is None:
        return None
    bad = ClickFileError(f"{where}: 'size_mm' must be a positive number of mm, got {_show(size)}")
    if isinstance(size, (bool, np.bool_)) or not isinstance(size, Real):
        raise bad
    try:
        f = float(size)
    except (OverflowError, ValueError, TypeError):
        raise bad from None
    if not (math.isfinite(f) and f > 0):
        raise bad
    return f


def _class_name(value, where: str, what: str) -> Optional[str]:
    """A Slicer string field (node name, control point label/description): None or a string."""
    if value is None or isinstance(value, str):
        return value
    raise ClickFileError(f"{where}: {what} must be a string, got {_show(value)}")


def _name_or_value(label: str) -> Union[str, int]:
    """A class given as text: an ASCII decimal ("2") is the label value 2, anything else a name
    ("2.9", "²" and "tumor" stay names and must match a class name exactly)."""
    v = label_value(label)
    return label if v is None else v


def _parse_own(obj: Mapping, source: str) -> ClicksByCase:
    out: ClicksByCase = {}
    for case, clicks in obj.items():
        if not isinstance(clicks, list):
            raise ClickFileError(f"{source}, case {case!r}: expected a list of clicks, got {type(clicks).__name__}")
        _check_count(len(clicks), f"{source}, case {case!r}")
        specs = []
        for n, c in enumerate(clicks):
            where = f"{source}, case {case!r}, click {n}"
            if not isinstance(c, dict):
                raise ClickFileError(f"{where}: expected an object with 'point' and 'label', got {_show(c)}")
            unknown = sorted(set(c) - _OWN_KEYS)
            if unknown:
                raise ClickFileError(f"{where}: unknown key(s) {unknown}; a click has {sorted(_OWN_KEYS)}")
            for key in ("point", "label"):
                if key not in c:
                    raise ClickFileError(f"{where}: missing {key!r}")
            positive = c.get("positive", True)
            if not isinstance(positive, bool):
                raise ClickFileError(f"{where}: 'positive' must be true or false, got {_show(positive)}")
            space = c.get("space", "physical")
            if not isinstance(space, str) or space not in SPACES:
                raise ClickFileError(f"{where}: 'space' must be one of {SPACES}, got {_show(space)}")
            specs.append(ClickSpec(_point(c["point"], where), _label(c["label"], where), positive, space, where,
                                   _size_mm(c.get("size_mm"), where)))
        out[str(case)] = specs
    return out


def _parse_monai_case(obj: Mapping, case: str, source: str) -> List[ClickSpec]:
    specs = []
    _check_count(sum(len(p) for p in obj.values() if isinstance(p, list)), f"{source}, case {case!r}")
    for label, points in obj.items():
        where = f"{source}, case {case!r}, label {label!r}"
        if not isinstance(points, list):
            raise ClickFileError(f"{where}: expected a list of [x, y, z] points, got {_show(points)}")
        lab = _label(_name_or_value(label), where)
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
    _check_count(sum(len(n["controlPoints"]) for n in markups
                     if isinstance(n, dict) and isinstance(n.get("controlPoints"), list)), f"{source}, case {case!r}")
    for m, node in enumerate(markups):
        where_node = f"{source}, case {case!r}, markup {m}"
        if not isinstance(node, dict):
            raise ClickFileError(f"{where_node}: expected an object, got {_show(node)}")
        system = node.get("coordinateSystem", "RAS")
        if not isinstance(system, str) or system.upper() not in ("RAS", "LPS"):
            raise ClickFileError(f"{where_node}: coordinateSystem must be RAS or LPS, got {_show(system)}")
        system = system.upper()
        name = _class_name(node.get("name"), where_node, "the node's 'name' (the class)")
        points = node.get("controlPoints", [])
        if not isinstance(points, list):
            raise ClickFileError(f"{where_node}: 'controlPoints' must be a list")
        for n, cp in enumerate(points):
            where = f"{where_node} ({name!r}), control point {n}"
            if not isinstance(cp, dict) or "position" not in cp:
                raise ClickFileError(f"{where}: expected an object with 'position', got {_show(cp)}")
            pos = _point(cp["position"], where)
            if len(pos) != 3:
                raise ClickFileError(f"{where}: Slicer positions have 3 coordinates, got {pos}")
            if system == "RAS":
                pos = (-pos[0], -pos[1], pos[2])
            desc = (_class_name(cp.get("description"), where, "'description'") or "").strip()
            cp_label = (_class_name(cp.get("label"), where, "'label'") or "").strip()
            negative = cp_label.endswith("-") or desc.lower() == "negative"
            label = desc if desc and desc.lower() not in ("negative", "positive") else name
            if label is None or not label.strip():
                raise ClickFileError(
                    f"{where}: no class: name the markup node after the class (e.g. 'tumor') or put the "
                    f"class in the control point's description")
            label = _name_or_value(label.strip())
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
                    f"{source}, case {k!r}: expected {{label: [[x, y, z], ...]}}, got {_show(v)}")
            out[str(k)] = _parse_monai_case(v, str(k), source)
        return out
    if all(isinstance(v, list) for v in values):
        return _parse_own(obj, source)
    bad = next((k for k, v in obj.items() if not isinstance(v, (list, dict))), None)
    if bad is None:
        raise ClickFileError(
            f"{source}: cannot tell the click format: some keys hold lists and others objects; expected case ids "
            f"with lists of clicks, a MONAI-style {{label: [[x, y, z], ...]}} or {{case_id: {{label: [...]}}}}")
    raise ClickFileError(
        f"{source}: cannot tell the click format: key {bad!r} holds {_show(obj[bad])}; expected "
        f"case ids with lists of clicks, a MONAI-style {{label: [[x, y, z], ...]}} or a Slicer markups file")


def decode_json(data: bytes, source: str):
    """JSON content of a click file's bytes; ClickFileError naming ``source`` unless it is UTF-8
    JSON that Python can hold (no nesting deeper than the interpreter's recursion limit, no
    integer of more than 4300 digits)."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ClickFileError(f"{source}: not a UTF-8 text file ({e.reason} at byte {e.start})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ClickFileError(f"{source}: not valid JSON ({e})") from None
    except RecursionError:
        raise ClickFileError(f"{source}: JSON nested too deeply to read") from None
    except ValueError as e:  # e.g. an integer beyond Python's digit limit
        raise ClickFileError(f"{source}: not usable JSON ({e})") from None


def parse_click_bytes(data: bytes, source: str, case: Optional[str] = None) -> ClicksByCase:
    """Parse a click file's content (bytes) in any supported format; see :func:`parse_clicks`."""
    obj = decode_json(data, source)
    try:
        return parse_clicks(obj, source, case)
    except RecursionError:
        raise ClickFileError(f"{source}: clicks nested too deeply to read") from None


def _load_file(path: str, case: Optional[str] = None) -> ClicksByCase:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ClickFileError(f"{path}: cannot read click file ({e.strerror})") from e
    return parse_click_bytes(data, path, case)


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
                        got = _load_file(os.path.join(full, sub), case=name)
                        per_case += got.get(name, [])
                        if set(got) - {name}:
                            raise ClickFileError(
                                f"{os.path.join(full, sub)}: files inside the case folder {name!r} may only hold "
                                f"clicks of that case, found {sorted(set(got) - {name})}")
                _check_count(len(per_case), f"{full}, case {name!r}")
                if per_case:
                    _merge(out, {name: per_case}, full)
            elif name.endswith(".json"):
                _merge(out, _load_file(full), full)
        return out
    if not os.path.isfile(path):
        raise ClickFileError(f"click file {path} does not exist")
    return _load_file(path)


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
    if not isinstance(clicks, (list, tuple)):
        raise ClickFileError(f"{source}: expected a list of clicks for case {case!r}, got {_show(clicks)}")
    _check_count(len(clicks), f"{source}, case {case!r}")
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

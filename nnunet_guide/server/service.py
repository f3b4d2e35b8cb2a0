"""The served model: images in the client's axis order in, prompts to clicks, one class's mask out.

**Axis convention.** nnInteractive clients send the image as ``[C, X, Y, Z]`` where the three
spatial axes are those of the numpy array the viewer holds, and ``image_properties["spacing"]``
in the same order. napari-nninteractive sends the napari layer's data, which napari's NIfTI/ITK
readers (and SimpleITK's ``GetArrayFromImage``) give in array order ``(z, y, x)``: the order
nnU-Net's SimpleITK reader returns and our models were trained in. So by default (``axis_order
"zyx"``) client axis i *is* the model's array axis i. ``axis_order`` names, for each client axis,
which model array axis it is (e.g. ``"xyz"`` for a client holding ITK index order, as nibabel
gives for canonical NIfTI): images, spacings, prompt coordinates and masks are permuted into the
model's order, predictions permuted back, so the client always works on its own grid.

A silently transposed upload (right numbers, wrong order) is refused when it can be seen: when
both the model's training spacing and the upload's spacing (in model order) have one axis at least
``ANISOTROPY`` times coarser than the others and those axes differ, the image is refused with
both spacings and the ``--axis-order`` hint (``check_axes=False`` turns this off, e.g. for
sagittal MRI acquisitions a model was not trained on).
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from nnunetv2.inference.sliding_window_prediction import compute_steps_for_sliding_window

from ..core.clicks import Click, box_click, target_mask
from ..core.prompts import (PromptError, prompt_step_mm, check_inside, clip_box, lasso_clicks,
                            scribble_clicks)
from ..inference.click_io import object_sigma
from ..inference.predictor import GuidedPredictor
from ..inference.session import GuidedSession
from ..settings import GuideSettingsError

AXES = "zyx"
ANISOTROPY = 1.2


class ImageError(ValueError):
    """An uploaded image the model cannot take (channels, dimensions, spacing, axis order)."""


def parse_axis_order(order: str) -> Tuple[int, ...]:
    """``"zyx"`` -> (0, 1, 2): per client axis, the model array axis it is (a permutation of z, y, x)."""
    o = str(order).strip().lower()
    if sorted(o) != sorted(AXES):
        raise ValueError(f"axis order {order!r} must be a permutation of 'zyx' (the model's array axes, "
                         f"listed in the client's axis order)")
    return tuple(AXES.index(c) for c in o)


def dominant_axis(spacing: Sequence[float], ratio: float = ANISOTROPY) -> Optional[int]:
    """The axis whose spacing is at least ``ratio`` times every other axis' (None if none is)."""
    s = np.asarray(spacing, float)
    a = int(np.argmax(s))
    others = np.delete(s, a)
    return a if others.size and np.all(s[a] >= ratio * others) else None


class GuideModel:
    """A trained guide model loaded once, serving one guided class.

    Args:
        model_folder, folds, checkpoint: the trained model (nnU-Net's ``-m``-style folder).
        label: the guided class the target buffer shows (name or label value); None: the only
            guided class (a model with several asks for it).
        device: torch device.
        license: what ``/capabilities`` reports as the model's licence (viewers display it).
        axis_order: see module docstring.
        cache_dtype: dtype of the sessions' tile caches (float16 halves their memory).
        check_axes: refuse uploads whose anisotropy contradicts the model's (module docstring).
    """

    def __init__(self, model_folder: str, folds=(0,), checkpoint: str = "checkpoint_final.pth",
                 label=None, device: torch.device = torch.device("cpu"), axis_order: str = "zyx",
                 cache_dtype: torch.dtype = torch.float16, check_axes: bool = True, tile_step_size: float = 0.5,
                 license: str = "not stated"):
        self.predictor = GuidedPredictor(tile_step_size=tile_step_size, use_mirroring=False, device=device,
                                         allow_tqdm=False)
        self.predictor.initialize_from_trained_model_folder(model_folder, folds, checkpoint)
        self.layout = self.predictor.layout
        self.model_folder = model_folder
        self.license = license
        targets = self.layout.targets
        if label is None:
            if len(targets) != 1:
                raise GuideSettingsError(
                    f"{model_folder}: this model guides {len(targets)} classes "
                    f"({', '.join(t.name for t in targets)}); choose the one to serve with --label NAME")
            self.target = 0
        else:
            self.target = self.layout.target_index(label)
        self.label_name = targets[self.target].name
        self.label_values = tuple(targets[self.target].labels)
        self.perm = parse_axis_order(axis_order)
        self.axis_order = axis_order
        self.inv = tuple(int(i) for i in np.argsort(self.perm))  # model axis j <- client axis inv[j]
        self.cache_dtype = cache_dtype
        self.check_axes = check_axes
        self.negatives = bool(self.layout.guide.negatives)
        pm, cm = self.predictor.plans_manager, self.predictor.configuration_manager
        sp_t = np.asarray(cm.spacing, float)
        if self.predictor.is_2d:  # 2D configurations: the slice axis keeps the image's spacing
            sp_t = np.concatenate([[np.nan], sp_t])
        # training spacing per raw (untransposed) array axis
        self.train_spacing = sp_t[list(np.argsort(pm.transpose_forward))]

    # ---- sessions ----------------------------------------------------------------------------
    def new_session(self) -> GuidedSession:
        # all sessions share the predictor and so its per-fold networks (read-only in inference)
        return GuidedSession(self.predictor, cache_dtype=self.cache_dtype, update="local")

    def guide_step_mm(self, spacing) -> float:
        """Grid step (mm) of scribble and lasso clicks, as the trainer simulates them."""
        return prompt_step_mm(self.layout.guide, spacing)

    # ---- images ------------------------------------------------------------------------------
    def image_to_model(self, image: np.ndarray, spacing) -> Tuple[np.ndarray, List[float]]:
        """Client image [C, X, Y, Z] + spacing -> model-order array (C, z, y, x) and spacing.
        ImageError (4xx) if the channel count, dimensions or spacing do not fit."""
        n_img = self.layout.num_image_channels
        if image.ndim != 4:
            raise ImageError(f"image has shape {list(image.shape)}; expected 4 axes [C, X, Y, Z]")
        if image.shape[0] != n_img:
            names = [c.get("name") for c in self.layout.channels[:n_img]]
            raise ImageError(f"image has {image.shape[0]} channel(s); this model was trained with {n_img} "
                             f"({', '.join(str(n) for n in names)})")
        if min(image.shape[1:]) < 1:
            raise ImageError(f"image has an empty axis: shape {list(image.shape)}")
        if image.dtype.kind not in "biuf":
            raise ImageError(f"image dtype {image.dtype} is not numeric")
        if spacing is None:
            raise ImageError("image_properties.spacing is missing: send the voxel size (mm) per spatial axis, "
                             "in the image's axis order")
        try:
            sp = [float(v) for v in spacing]
        except (TypeError, ValueError):
            raise ImageError(f"image_properties.spacing {spacing!r} must be 3 numbers (mm)") from None
        if len(sp) != 3 or not all(np.isfinite(sp)) or min(abs(v) for v in sp) == 0:
            raise ImageError(f"image_properties.spacing {spacing!r} must be 3 non-zero numbers (mm), one per "
                             f"spatial axis of the image (shape {list(image.shape[1:])})")
        # a negative spacing is a display flip (napari-nifti gives SAR+ arrays with negative scales):
        # the array's axis order is what matters here
        sp = [abs(v) for v in sp]
        arr = np.ascontiguousarray(image.transpose(0, *[1 + i for i in self.inv]), dtype=np.float32)
        sp_model = [sp[i] for i in self.inv]
        if self.check_axes:
            want, got = dominant_axis(np.nan_to_num(self.train_spacing, nan=0.0)), dominant_axis(sp_model)
            if want is not None and got is not None and want != got:
                raise ImageError(
                    f"image axis order looks transposed: spacing {sp} (client order, read as "
                    f"{self.axis_order!r}) puts the coarse axis on model axis {AXES[got]}, but the model was "
                    f"trained with spacing {[round(float(v), 3) for v in self.train_spacing]} (z, y, x), coarse on "
                    f"{AXES[want]}. Send the array as SimpleITK's GetArrayFromImage returns it with the spacing "
                    f"in the same order, or start the server with the matching --axis-order "
                    f"(or --no-axis-check if this orientation is intended)")
        return arr, sp_model

    def to_client(self, model_array: np.ndarray) -> np.ndarray:
        """A model-order spatial array (z, y, x) in the client's axis order."""
        return model_array.transpose(self.perm)

    def mask(self, session: GuidedSession) -> np.ndarray:
        """The served class's current mask (bool) in the client's axis order."""
        seg = session.segmentation
        m = target_mask(seg, self.label_values)
        return self.to_client(m)

    def mask_in(self, session: GuidedSession, box: Tuple[slice, ...]) -> np.ndarray:
        """:meth:`mask` inside ``box`` (slices in the client's axis order) only."""
        seg = session.segmentation[tuple(box[i] for i in self.inv)]
        m = target_mask(seg, self.label_values)
        return self.to_client(m)

    def changed_box(self, session: GuidedSession) -> Optional[Tuple[slice, ...]]:
        """Where the session's last update can have changed the segmentation, as slices in the
        client's axis order; ``()`` if it changed nothing; None if unknown (resampling: nnU-Net's
        export rebuilds the whole segmentation)."""
        info = session.last_update
        if info.region is None:
            return ()
        if session._resampled:
            return None
        geo = session.geometry
        lo_t, hi_t = [], []
        for (a, b), inner, start, n in zip(info.region, session._inner, geo.bbox_start, session.preprocessed_shape):
            lo_t.append(min(max(a - inner.start, 0), n) + start)
            hi_t.append(min(max(b - inner.start, 0), n) + start)
        tb = geo.transpose_backward
        lo_raw, hi_raw = [lo_t[tb[i]] for i in range(len(tb))], [hi_t[tb[i]] for i in range(len(tb))]
        box = tuple(slice(int(lo_raw[j]), int(hi_raw[j])) for j in self.perm)
        return () if any(s_.stop <= s_.start for s_ in box) else box

    def estimate_memory(self, client_shape: Sequence[int], spacing_model: Sequence[float]) -> int:
        """Bytes a session on this image will hold (before it is built): input, guides, blended
        logits and weights per preprocessed voxel, the tile cache (nnU-Net's sliding-window tiles
        x patch x classes), segmentation and the client mask per raw voxel."""
        p = self.predictor
        raw = np.asarray([client_shape[i] for i in self.inv], float)
        target = np.nan_to_num(self.train_spacing, nan=1.0)
        target = np.where(target > 0, target, 1.0)
        pre = np.maximum(raw * np.asarray(spacing_model, float) / target, 1)
        if p.is_2d:
            pre[0] = raw[0]
        patch = [int(v) for v in p.configuration_manager.patch_size]
        pre = np.round(pre).astype(int)
        pre[-len(patch):] = np.maximum(pre[-len(patch):], patch)
        n_pre = float(np.prod(pre))
        c = self.layout.num_image_channels
        g = len(self.layout.guide_channel_indices)
        k = p.label_manager.num_segmentation_heads
        item = torch.tensor([], dtype=self.cache_dtype).element_size()
        steps = compute_steps_for_sliding_window(tuple(pre[-len(patch):]), tuple(patch), p.tile_step_size)
        tiles = int(np.prod([len(s) for s in steps])) * (int(pre[0]) if p.is_2d else 1)
        cache = tiles * float(np.prod(patch)) * k * item
        return int(n_pre * 4 * (c + g + 2 * k + 1) + cache + float(np.prod(raw)) * (1 + 1))

    # ---- prompts ----------------------------------------------------------------------------
    def _model_point(self, coords) -> np.ndarray:
        c = np.asarray(coords, float)
        return c[list(self.inv)]

    def _to_pre(self, session: GuidedSession, clicks: Sequence[Click], what: str, drop_outside: bool) -> List[Click]:
        """Raw (model-order array) clicks -> preprocessed clicks; outside nnU-Net's crop: dropped
        (masks) or PromptError (points)."""
        if not clicks:
            return []
        geo = session.geometry
        pos = geo.raw_to_preprocessed(np.array([c.position for c in clicks], float))
        inside = geo.inside(pos)
        if not inside.all() and not drop_outside:
            raise PromptError(f"{what} lies outside the part of the image nnU-Net keeps (its non-zero crop)")
        if not inside.any():
            raise PromptError(f"{what} lies entirely outside the part of the image nnU-Net keeps (its non-zero crop)")
        sigma = object_sigma(None, session.properties, geo)
        return [Click(c.target, tuple(float(v) for v in p), c.positive, c.sigma if c.sigma is not None else sigma,
                      c.kind) for c, p, ok in zip(clicks, pos, inside) if ok]

    def client_shape(self, session: GuidedSession) -> Tuple[int, ...]:
        return tuple(int(session.geometry.raw_shape[i]) for i in self.perm)

    def point_clicks(self, session: GuidedSession, coordinates, positive: bool) -> List[Click]:
        shape = self.client_shape(session)
        check_inside(coordinates, shape, "point")
        self._check_sign(positive)
        raw = Click(self.target, tuple(self._model_point(coordinates)), bool(positive))
        return self._to_pre(session, [raw], f"point {list(coordinates)}", drop_outside=False)

    def bbox_clicks(self, session: GuidedSession, bbox, positive: bool) -> List[Click]:
        shape = self.client_shape(session)
        lo, hi = clip_box(bbox, shape)
        self._check_sign(positive)
        lo_m, hi_m = lo[list(self.inv)], hi[list(self.inv)]
        geo = session.geometry
        # half-open voxel edges map like points half a voxel before them
        edges = geo.raw_to_preprocessed(np.stack([lo_m - 0.5, hi_m - 0.5])) + 0.5
        elo = np.clip(np.minimum(edges[0], edges[1]), 0, np.asarray(geo.preprocessed_shape, float))
        ehi = np.clip(np.maximum(edges[0], edges[1]), 0, np.asarray(geo.preprocessed_shape, float))
        if np.any(ehi <= elo):
            raise PromptError(f"box {np.asarray(bbox).tolist()} lies outside the part of the image nnU-Net keeps "
                              f"(its non-zero crop)")
        return [box_click(self.target, elo, np.maximum(ehi, elo + 1e-3), positive)]

    def mask_clicks(self, session: GuidedSession, kind: str, mask: np.ndarray, positive: bool,
                    interaction_bbox=None) -> List[Click]:
        """Scribble or lasso mask (full image, or the crop ``interaction_bbox`` [[lo, hi], ...])."""
        shape = self.client_shape(session)
        self._check_sign(positive)
        mask = np.asarray(mask)
        if mask.ndim != 3:
            raise PromptError(f"{kind} mask has shape {list(mask.shape)}; expected 3 axes")
        if interaction_bbox is None:
            if tuple(mask.shape) != shape:
                raise PromptError(f"{kind} mask has shape {list(mask.shape)}, the image {list(shape)}; send the "
                                  f"full-size mask or interaction_bbox with the crop's position")
            offset = np.zeros(3, int)
        else:
            try:
                b = np.asarray(interaction_bbox, int)
            except (TypeError, ValueError):
                raise PromptError(f"interaction_bbox {interaction_bbox!r} must be [[lo, hi], ...] per axis") from None
            if b.shape != (3, 2) or np.any(b[:, 1] - b[:, 0] != np.asarray(mask.shape)):
                raise PromptError(f"interaction_bbox {interaction_bbox!r} does not match the {kind} mask of shape "
                                  f"{list(mask.shape)}")
            offset = b[:, 0]
        m = mask.transpose(self.inv)
        off = offset[list(self.inv)]
        raw_shape = session.geometry.raw_shape
        raw_spacing = np.asarray(session.properties["spacing"], float)
        fn = scribble_clicks if kind == "scribble" else lasso_clicks
        raw = fn(self.target, m, positive, raw_spacing, self.guide_step_mm(raw_spacing), raw_shape, off)
        return self._to_pre(session, raw, f"{kind} mask", drop_outside=True)

    def _check_sign(self, positive: bool) -> None:
        if not positive and not self.negatives:
            raise PromptError("this model has no negative guide channels: negative prompts are not supported")

    # ---- capabilities -----------------------------------------------------------------------
    def capabilities(self, do_autozoom: bool = False) -> dict:
        guide = self.layout.guide
        pos = self.layout.guide_channel(self.target, True)
        neg = self.layout.guide_channel(self.target, False) if self.negatives else None
        sup = {"point": True, "points": True, "bbox2d": True, "bbox3d": True, "scribble": True,
               "lasso": True, "initial_seg": False}
        return {
            "supported_interactions": sup,
            "channel_mapping": {k: [pos, neg] for k in ("point", "bbox", "scribble", "lasso")},
            "num_interaction_channels": len(self.layout.guide_channel_indices),
            "supports_initial_label": False,
            "supports_zero_shot_label_refinement": False,
            "preferred_scribble_thickness": [3, 3, 3],
            "interaction_decay": 1.0,
            "inference_session_version": "nnunet-guide",
            "license": self.license,
            "supports_undo": True,
            "do_autozoom": bool(do_autozoom),
            # ours: what the loaded model is and serves
            "nnunet_guide": {
                "label": self.label_name, "label_values": list(self.label_values),
                "guided_classes": [t.name for t in self.layout.targets],
                "num_image_channels": self.layout.num_image_channels,
                "axis_order": self.axis_order, "encoding": guide.encoding, "sigma_mm": guide.sigma_mm,
                "negatives": self.negatives, "automatic_first_pass": True,
                "trained_prompts": trained_prompts(guide),
            },
        }


def trained_prompts(guide) -> List[str]:
    """Which prompt kinds the model's training simulated (settings without the fields: points)."""
    kinds = ["point"]
    if getattr(guide, "p_box", 0.0) > 0:
        kinds.append("bbox")
    if getattr(guide, "p_scribble", 0.0) > 0:
        kinds += ["scribble", "lasso"]
    return kinds

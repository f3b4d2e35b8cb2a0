"""An interactive session: one image, clicks added one at a time, the segmentation kept current.

The session tiles the image as nnU-Net's sliding window does (nnU-Net's own slicers and Gaussian
weights), predicts each tile with :meth:`GuidedPredictor.predict_window`, and keeps every tile's
network output. A click changes the guide channels only near the click (a guide is local: it is zero, or
"no guide", outside its render window), so only the tiles that overlap the changed region are
predicted again; the blended logits are then rebuilt in that region from the stored tiles, in
the same order as a full prediction. An update therefore gives bit-for-bit the result of
predicting the whole image again with all clicks (:meth:`GuidedSession.full_logits` checks that).

Two update modes (``GuidedSession(..., update="exact" | "local")``):

``exact`` (default): every sliding-window tile that overlaps the changed guide region is
    predicted again (with nnU-Net's 50% tile overlap, away from the volume's edges, at least 2
    tiles per axis, 8 in 3D).
``local``: one patch centred on the new (or undone) click is predicted and blended in (weight 1
    over the patch's central three quarters, ramping to 0 at its border): one forward pass per
    click, whatever the guide's reach, in the spirit of nnInteractive. The result differs from a
    full prediction outside that patch (tiles there still hold the pre-click outputs, and a wide
    guide's faint tail beyond the patch is not seen); :meth:`GuidedSession.refresh` makes it exact
    again by predicting the stale tiles. When the changed clicks need as many patches as an exact
    update would predict tiles (e.g. ``reset`` after many clicks), the update is exact.

Coordinates (``add_click(..., space=...)``):
    ``"physical"``: mm, ITK/LPS as SimpleITK reports (needs a file or ``sitk_stuff`` properties);
    ``"voxel"``: ITK index ``(i, j, k)``; ``"array"``: index of the input array ``(z, y, x)``;
    ``"preprocessed"``: index into nnU-Net's preprocessed array (after transpose, crop, resampling).

Typical use::

    session = GuidedSession.from_model_folder(model_folder, folds=(0,), device=torch.device("cpu"))
    session.set_image("case_0000.nii.gz")
    seg = session.segmentation                       # automatic
    session.add_click((-30.5, 12.0, 88.0), "tumor")  # physical LPS mm
    session.add_click((40, 61, 17), "tumor", positive=False, space="voxel")
    session.undo()
    session.reset()
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from nnunetv2.inference.sliding_window_prediction import compute_gaussian
from acvl_utils.cropping_and_padding.padding import pad_nd_image

from ..core.clicks import Click
from ..core.coords import PreprocessedGeometry
from ..network import automatic_norm_statistics
from .click_io import ClickFileError, ClickSpec, click_targets, object_sigma, resolve_clicks
from .predictor import GuidedPredictor

SPACES = ("physical", "voxel", "array", "preprocessed")
UPDATE_MODES = ("exact", "local")


@dataclass
class UpdateInfo:
    """What the last change cost: patches predicted (tiles, or the one local patch), of all tiles;
    the updated region (padded preprocessed grid, half-open per axis); mode used; seconds."""
    tiles_predicted: int = 0
    tiles_total: int = 0
    region: Optional[Tuple[Tuple[int, int], ...]] = None
    seconds: float = 0.0
    mode: str = "exact"


@dataclass
class _Action:
    description: str
    clicks: List[Click] = field(default_factory=list)


class GuidedSession:
    """Interactive guided segmentation of one image with a :class:`GuidedPredictor`.

    Args:
        predictor: an initialised GuidedPredictor (its folds, mirroring, tile step size and
            device are used).
        cache_dtype: dtype of the stored tile outputs (float32; float16 halves memory).
        update: ``"exact"`` or ``"local"`` (see module docstring).
    """

    def __init__(self, predictor: GuidedPredictor, cache_dtype: torch.dtype = torch.float32, update: str = "exact"):
        if update not in UPDATE_MODES:
            raise ValueError(f"update must be one of {UPDATE_MODES}, got {update!r}")
        self.update = update
        if predictor.layout is None:
            raise RuntimeError("initialise the predictor first (initialize_from_trained_model_folder)")
        self.predictor = predictor
        self.cache_dtype = cache_dtype
        self.layout = predictor.layout
        self._actions: List[_Action] = []
        self.last_update = UpdateInfo()
        self._image_loaded = False

    @classmethod
    def from_model_folder(cls, model_folder: str, folds=(0,), checkpoint_name: str = "checkpoint_final.pth",
                          device: torch.device = torch.device("cuda"), use_mirroring: bool = False,
                          tile_step_size: float = 0.5, **kwargs) -> "GuidedSession":
        """A session on a trained model folder. Mirroring is off by default (interactive speed)."""
        p = GuidedPredictor(tile_step_size=tile_step_size, use_mirroring=use_mirroring, device=device,
                            allow_tqdm=False)
        p.initialize_from_trained_model_folder(model_folder, folds, checkpoint_name)
        return cls(p, **kwargs)

    # ---- windows ----------------------------------------------------------------------------
    def _predict_slicer(self, slicer) -> torch.Tensor:
        """Fold-averaged (mirrored, if enabled) network output of one window
        (:meth:`GuidedPredictor.predict_window`): (K, *window); a 2D window gets a singleton slice
        axis."""
        window = tuple((s.start, s.stop) for s in slicer if isinstance(s, slice))
        norms = self._automatic_norms()
        for n in norms:  # the window's automatic statistics are kept: a click costs one pass
            n.begin_window(window)
        try:
            out = self.predictor.predict_window(self._x[slicer])
        finally:
            for n in norms:
                n.begin_window(None)
        if self._is_2d:
            out = out[:, None]
        return out

    def _automatic_norms(self) -> list:
        """Per fold network, its :class:`~nnunet_guide.network.AutomaticNormStatistics` (none for
        models normalising as nnU-Net does)."""
        norms = (automatic_norm_statistics(v.network) for v in self.predictor.fold_predictors())
        return [n for n in norms if n is not None]

    def _predict_tile(self, t: int) -> torch.Tensor:
        return self._predict_slicer(self._slicers[t]).to("cpu", self.cache_dtype)

    # ---- image ------------------------------------------------------------------------------
    def set_image(self, image: Union[str, Sequence[str], np.ndarray], properties: Optional[dict] = None,
                  case_id: str = "image") -> None:
        """Preprocess an image (file name(s), or an array (C, z, y, x)/(z, y, x) with nnU-Net
        reader properties) and predict it automatically. Clicks of a previous image are dropped."""
        t0 = time.perf_counter()
        self._image_loaded = False
        p = self.predictor
        data, props = p.preprocess(image, properties)
        self.case_id = case_id
        self.properties = props
        self.preprocessed_shape = tuple(int(s) for s in data.shape[1:])
        self.geometry = PreprocessedGeometry.from_properties(props, p.plans_manager.transpose_forward,
                                                             self.preprocessed_shape)
        self._is_2d = p.is_2d
        n_img, n_guide = self.layout.num_image_channels, len(self.layout.guide_channel_indices)
        padded, revert = pad_nd_image(data, p.configuration_manager.patch_size, "constant", {"value": 0}, True, None)
        self._inner = tuple(revert[1:])  # unpadded region inside the padded grid
        self._n_img = n_img
        self._x = torch.zeros((n_img + n_guide, *padded.shape[1:]), dtype=torch.float32)
        self._x[:n_img] = padded
        self._x[n_img:] = self._guide_block([])  # the guides live in _x only (no second copy)
        for n in self._automatic_norms():
            n.cache = {}  # automatic statistics per window of this image
        self._slicers = p._internal_get_sliding_window_slicers(tuple(padded.shape[1:]))
        self._bounds = [self._tile_bounds(s) for s in self._slicers]
        patch = tuple(int(v) for v in p.configuration_manager.patch_size)
        if p.use_gaussian:
            # nnU-Net's weights exactly (it builds them in float16; tiny corner weights depend on that)
            g = compute_gaussian(patch, sigma_scale=1. / 8, value_scaling_factor=10, dtype=torch.float16,
                                 device=torch.device("cpu")).float()
        else:
            g = torch.ones(patch)
        self._gauss = g[None] if self._is_2d else g
        self._weights = torch.zeros(padded.shape[1:], dtype=torch.float32)
        for lo, hi in self._bounds:
            self._weights[tuple(slice(a, b) for a, b in zip(lo, hi))] += self._gauss
        k = p.label_manager.num_segmentation_heads
        self._sum = torch.zeros((k, *padded.shape[1:]), dtype=torch.float32)
        self._cache: List[Optional[torch.Tensor]] = [None] * len(self._slicers)
        self._actions = []
        self._applied: List[Click] = []  # the clicks the logits were last updated for
        self._group_moved = False  # next local update: one window for all moved clicks if they fit
        for t in range(len(self._slicers)):
            self._cache[t] = self._predict_tile(t)
        self._current = torch.zeros_like(self._sum)
        self._stale: set = set()  # tiles whose input changed since they were predicted
        self._pending: List[Tuple[Tuple[int, int], ...]] = []  # windows blended by local updates
        self._rebuild(tuple((0, s) for s in padded.shape[1:]))
        self._seg = None
        self._image_loaded = True
        self.last_update = UpdateInfo(len(self._slicers), len(self._slicers), None, time.perf_counter() - t0)

    def _tile_bounds(self, slicer) -> Tuple[Tuple[int, ...], Tuple[int, ...]]:
        lo, hi = [], []
        for s in slicer[1:]:
            if isinstance(s, slice):
                lo.append(int(s.start))
                hi.append(int(s.stop))
            else:  # 2D configuration: an int slice index
                lo.append(int(s))
                hi.append(int(s) + 1)
        return tuple(lo), tuple(hi)

    # ---- guides -----------------------------------------------------------------------------
    def _all_clicks(self) -> List[Click]:
        return [c for a in self._actions for c in a.clicks]

    def _guide_block(self, clicks: Sequence[Click]) -> torch.Tensor:
        """Guide channels on the padded grid, as GuidedPredictor feeds them: without clicks the
        network's own "no guide" fill; with clicks the rendered guides, zero in the padding."""
        n_guide = len(self.layout.guide_channel_indices)
        shape = self._x.shape[1:]
        if not clicks:
            return torch.full((n_guide, *shape), self.layout.guide.no_guide_value, dtype=torch.float32)
        block = torch.zeros((n_guide, *shape), dtype=torch.float32)
        block[(slice(None), *self._inner)] = torch.from_numpy(
            self.predictor.render_guides(clicks, self.preprocessed_shape, self.properties))
        return block

    def _apply_clicks(self) -> UpdateInfo:
        """Re-render guides and update the logits where the guides changed."""
        t0 = time.perf_counter()
        clicks = self._all_clicks()
        new = self._guide_block(clicks)
        changed = (new != self._x[self._n_img:]).any(0)
        moved = [c for c in clicks if c not in self._applied] + [c for c in self._applied if c not in clicks]
        self._applied = list(clicks)
        if not changed.any():
            self.last_update = UpdateInfo(0, len(self._slicers), None, time.perf_counter() - t0, self.update)
            return self.last_update
        idx = torch.nonzero(changed)
        clo, chi = idx.min(0).values.tolist(), (idx.max(0).values + 1).tolist()
        self._x[self._n_img:] = new
        overlapping = {t for t, (lo, hi) in enumerate(self._bounds)
                       if all(l < ch and h > cl for l, h, cl, ch in zip(lo, hi, clo, chi))}
        group, self._group_moved = self._group_moved, False
        windows = (self._local_windows(moved) if group else [self._click_window(c) for c in moved]
                   ) if self.update == "local" else []
        if 0 < len(windows) < len(overlapping):
            self._stale |= overlapping
            self._pending += windows
            for w in windows:
                self._blend_local(w)
            region = tuple((min(w[a][0] for w in windows), max(w[a][1] for w in windows))
                           for a in range(len(windows[0])))
            n, mode = len(windows), "local"
        else:
            region = self._update_exact(overlapping)
            n, mode = self._n_last_exact, "exact"
        self._update_segmentation(region)
        self.last_update = UpdateInfo(n, len(self._slicers), region, time.perf_counter() - t0, mode)
        return self.last_update

    def _update_exact(self, tiles) -> Tuple[Tuple[int, int], ...]:
        """Predict the given and all stale tiles again; rebuild the region they cover."""
        dirty = sorted(set(tiles) | self._stale)
        for t in dirty:
            self._cache[t] = self._predict_tile(t)
        self._stale.clear()
        self._n_last_exact = len(dirty)
        boxes = [self._bounds[t] for t in dirty] + [tuple(zip(*w)) for w in self._pending]
        self._pending = []
        rlo = np.min([b[0] for b in boxes], 0)
        rhi = np.max([b[1] for b in boxes], 0)
        region = tuple((int(a), int(b)) for a, b in zip(rlo, rhi))
        self._rebuild(region)
        return region

    def _click_window(self, click: Click) -> Tuple[Tuple[int, int], ...]:
        """The patch-sized window (padded grid, half-open per axis) centred on a click, moved
        inside the volume; a 2D configuration's window is the click's slice."""
        patch = [int(v) for v in self.predictor.configuration_manager.patch_size]
        shape = list(self._x.shape[1:])
        pos = [p + s.start for p, s in zip(click.position, self._inner)]
        window = []
        if self._is_2d:
            z = int(round(pos[0]))
            window.append((z, z + 1))
            pos, shape = pos[1:], shape[1:]
        for p, ps, n in zip(pos, patch, shape):
            start = min(max(int(round(p + 0.5 - ps / 2)), 0), n - ps)
            window.append((start, start + ps))
        return tuple(window)

    def _local_windows(self, moved: Sequence[Click]) -> List[Tuple[Tuple[int, int], ...]]:
        """Windows of a local update of one multi-click action (added or undone): one patch centred
        on its clicks when they all fit in half a patch (a short scribble, a small lasso), else one
        per click."""
        if len(moved) > 1:
            pos = np.array([c.position for c in moved], float)
            patch = np.array([int(v) for v in self.predictor.configuration_manager.patch_size], float)
            lo, hi = pos.min(0), pos.max(0)
            ext = hi - lo
            if self._is_2d:
                same_slice = ext[0] == 0
                ext = ext[1:]
            else:
                same_slice = True
            if same_slice and np.all(ext <= 0.5 * patch):
                return [self._click_window(Click(moved[0].target, tuple((lo + hi) / 2), True))]
        return [self._click_window(c) for c in moved]

    def _blend_local(self, window) -> Tuple[Tuple[int, int], ...]:
        """Predict one window and blend it into the current logits (weight 1 over the central
        three quarters, linear ramp to 0 over the outer eighth, none where the window meets the
        volume edge)."""
        sl = tuple(slice(a, b) for a, b in window)
        slicer = (slice(None), window[0][0], *sl[1:]) if self._is_2d else (slice(None), *sl)
        pred = self._predict_slicer(slicer).to("cpu", torch.float32)
        alpha = torch.ones(pred.shape[1:])
        for ax, (a, b) in enumerate(window):
            n = b - a
            if n == 1:
                continue
            pos = torch.arange(n, dtype=torch.float32) + 0.5
            left = torch.clamp(pos / (n / 8), max=1.0) if a > 0 else torch.ones(n)
            right = torch.clamp((n - pos) / (n / 8), max=1.0) if b < self._x.shape[ax + 1] else torch.ones(n)
            shape = [1] * len(window)
            shape[ax] = n
            alpha = alpha * torch.minimum(left, right).reshape(shape)
        cur = self._current[(slice(None), *sl)]
        cur.mul_(1 - alpha).add_(alpha * pred)
        return tuple(window)

    def refresh(self) -> UpdateInfo:
        """Predict the tiles left stale by local updates: the logits become exact again."""
        self._require_image()
        t0 = time.perf_counter()
        if not self._stale and not self._pending:
            self.last_update = UpdateInfo(0, len(self._slicers), None, time.perf_counter() - t0, "exact")
            return self.last_update
        region = self._update_exact(())
        self._update_segmentation(region)
        self.last_update = UpdateInfo(self._n_last_exact, len(self._slicers), region, time.perf_counter() - t0,
                                      "exact")
        return self.last_update

    def _rebuild(self, region: Tuple[Tuple[int, int], ...]) -> None:
        """Blended logits inside ``region`` (padded grid, half-open) from the stored tiles, summed
        in tile order as a full prediction sums them."""
        lo = [a for a, _ in region]
        hi = [b for _, b in region]
        reg = (slice(None), *[slice(a, b) for a, b in region])
        self._sum[reg] = 0
        for t, (tlo, thi) in enumerate(self._bounds):
            ilo = [max(a, b) for a, b in zip(lo, tlo)]
            ihi = [min(a, b) for a, b in zip(hi, thi)]
            if any(a >= b for a, b in zip(ilo, ihi)):
                continue
            dst = (slice(None), *[slice(a, b) for a, b in zip(ilo, ihi)])
            src = tuple(slice(a - o, b - o) for a, b, o in zip(ilo, ihi, tlo))
            self._sum[dst] += self._cache[t][(slice(None), *src)].float() * self._gauss[src]
        self._current[reg] = self._sum[reg] / self._weights[reg[1:]]

    # ---- outputs ----------------------------------------------------------------------------
    @property
    def logits(self) -> torch.Tensor:
        """Blended logits (K, *preprocessed_shape), float32, in nnU-Net's preprocessed grid (a copy)."""
        self._require_image()
        return self._current[(slice(None), *self._inner)].clone()

    def full_logits(self) -> torch.Tensor:
        """Logits of a from-scratch prediction of every tile with the current clicks (slow; for
        checking that incremental updates are exact). Leaves the session's state untouched."""
        self._require_image()
        saved = self._cache, self._sum, self._current
        try:
            self._cache = [self._predict_tile(t) for t in range(len(self._slicers))]
            self._sum, self._current = torch.zeros_like(saved[1]), torch.zeros_like(saved[2])
            self._rebuild(tuple((0, s) for s in self._sum.shape[1:]))
            return self._current[(slice(None), *self._inner)].clone()
        finally:
            self._cache, self._sum, self._current = saved

    @property
    def _resampled(self) -> bool:
        return tuple(self.geometry.shape_after_cropping) != tuple(self.preprocessed_shape)

    def _update_segmentation(self, region) -> None:
        """Keep the image-space segmentation current in ``region`` when no resampling is involved
        (otherwise it is rebuilt by nnU-Net's export on the next access)."""
        if self._seg is None or self._resampled:
            self._seg = None
            return
        inner_lo = [s.start for s in self._inner]
        lo = [max(a - o, 0) for (a, _), o in zip(region, inner_lo)]
        hi = [min(b - o, n) for (_, b), o, n in zip(region, inner_lo, self.preprocessed_shape)]
        if any(a >= b for a, b in zip(lo, hi)):
            return
        pre = (slice(None), *[slice(a + o, b + o) for a, b, o in zip(lo, hi, inner_lo)])
        seg = self.predictor.label_manager.convert_logits_to_segmentation(self._current[pre])
        seg = seg.numpy() if isinstance(seg, torch.Tensor) else np.asarray(seg)
        view = self._seg.transpose(self.geometry.transpose_forward)  # transposed, uncropped
        start = self.geometry.bbox_start
        view[tuple(slice(a + s, b + s) for a, b, s in zip(lo, hi, start))] = seg

    @property
    def segmentation(self) -> np.ndarray:
        """Current segmentation in the input array's order (z, y, x), as nnU-Net exports it."""
        self._require_image()
        if self._seg is None:
            self._seg = np.ascontiguousarray(self.predictor.segmentation_from_logits(self.logits, self.properties))
        return self._seg

    # ---- clicks -----------------------------------------------------------------------------
    @property
    def clicks(self) -> List[Click]:
        """All current clicks, in preprocessed coordinates."""
        return self._all_clicks()

    @property
    def history(self) -> List[str]:
        return [a.description for a in self._actions]

    def _to_clicks(self, point, label, positive: bool, space: str, size_mm: Optional[float]) -> List[Click]:
        if space not in SPACES:
            raise ClickFileError(f"space must be one of {SPACES}, got {space!r}")
        where = f"session click {len(self._actions)} on {self.case_id!r}"
        pt = tuple(float(v) for v in np.asarray(point, dtype=float).ravel())
        spec = ClickSpec(pt, label, positive, "array" if space == "preprocessed" else space, where, size_mm)
        if space != "preprocessed":
            return resolve_clicks([spec], self.layout, self.case_id, self.properties,
                                  self.predictor.plans_manager.transpose_forward, self.preprocessed_shape)
        targets = click_targets(spec, self.layout, self.case_id)
        if len(pt) != len(self.preprocessed_shape) or not self.geometry.inside(np.array([pt]))[0]:
            raise ClickFileError(f"{where}: preprocessed index {list(pt)} is outside the preprocessed image "
                                 f"of shape {self.preprocessed_shape}")
        sigma = object_sigma(size_mm, self.properties, self.geometry)
        return [Click(t, pt, pos_, sigma) for t, pos_ in targets]

    def add_click(self, point, label, positive: bool = True, space: str = "physical",
                  size_mm: Optional[float] = None) -> UpdateInfo:
        """Add a click and update the segmentation.

        Args:
            point: coordinates in ``space`` (see module docstring).
            label: guided class name or label value, or ``"background"`` (negative for all).
            positive: False for "this is not ``label``".
            size_mm: the object's diameter, for ``object_gaussian`` models (guide sized by it).
        Returns:
            what the update cost (:class:`UpdateInfo`); also in ``last_update``.
        """
        self._require_image()
        clicks = self._to_clicks(point, label, positive, space, size_mm)
        self._actions.append(_Action(f"{'+' if positive else '-'}{label} at {list(point)} ({space})", clicks))
        try:
            return self._apply_clicks()
        except BaseException:
            self._actions.pop()
            raise

    def add_clicks(self, clicks: Sequence[Click], description: str = "clicks", run: bool = True
                   ) -> Optional[UpdateInfo]:
        """Add several clicks (preprocessed coordinates, as :attr:`clicks` holds them) as one
        action: one undo step (a box, a scribble, a lasso). With ``run=False`` the action is only
        queued; :meth:`apply_pending` (or the next run) updates the segmentation."""
        self._require_image()
        clicks = list(clicks)
        n = len(self.preprocessed_shape)
        for c in clicks:
            if not 0 <= c.target < len(self.layout.targets):
                raise ClickFileError(f"{description}: click target {c.target} out of range "
                                     f"({len(self.layout.targets)} guided classes)")
            if len(c.position) != n or not self.geometry.inside(np.array([c.position], float))[0]:
                raise ClickFileError(f"{description}: preprocessed position {list(c.position)} is outside the "
                                     f"preprocessed image of shape {self.preprocessed_shape}")
        self._actions.append(_Action(description, clicks))
        if not run:
            return None
        self._group_moved = len(clicks) > 1
        try:
            return self._apply_clicks()
        except BaseException:
            self._actions.pop()
            raise

    @property
    def pending(self) -> bool:
        """Whether queued actions (``run=False``) have not been applied yet."""
        return self._image_loaded and self._all_clicks() != self._applied

    def apply_pending(self) -> UpdateInfo:
        """Update the segmentation for queued actions (nothing to do: no tile predicted)."""
        self._require_image()
        self._group_moved = True
        return self._apply_clicks()

    def memory_bytes(self) -> int:
        """Bytes held by this session's arrays (input + guides, tile cache, blended logits,
        weights, segmentation); 0 without an image."""
        if not self._image_loaded:
            return 0
        n = sum(t.numel() * t.element_size() for t in (self._x, self._sum, self._current,
                                                        self._weights))
        n += sum(t.numel() * t.element_size() for t in self._cache if t is not None)
        if self._seg is not None:
            n += self._seg.nbytes
        return int(n)

    def undo(self) -> UpdateInfo:
        """Remove the last click (no-op without clicks)."""
        self._require_image()
        if not self._actions:
            self.last_update = UpdateInfo(0, len(self._slicers), None, 0.0)
            return self.last_update
        removed = self._actions.pop()
        self._group_moved = len(removed.clicks) > 1
        return self._apply_clicks()

    def reset(self) -> UpdateInfo:
        """Remove all clicks: back to the automatic segmentation."""
        self._require_image()
        self._actions = []
        return self._apply_clicks()

    def _require_image(self) -> None:
        if not self._image_loaded:
            raise RuntimeError("no image: call set_image first")

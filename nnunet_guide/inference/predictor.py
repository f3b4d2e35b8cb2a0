"""``GuidedPredictor``: nnU-Net's predictor, fed with guide channels rendered from user clicks.

Guided prediction is nnU-Net's own prediction with one extra step: after nnU-Net preprocesses a
case, its clicks are mapped into the preprocessed voxel grid (:mod:`nnunet_guide.core.coords`),
rendered into guide channels with the settings written at training time
(``guide_settings.json``) and appended to the image channels. Everything else is nnU-Net's:
sliding window, Gaussian blending, test-time mirroring (the guides are flipped with the image),
fold ensembles (every fold sees the same guides), resampling back and export.

A case without clicks is fed its image channels only; the
:class:`~nnunet_guide.network.ExtraChannelNetwork` fills the guide channels with "no guide",
exactly as stock ``nnUNetv2_predict`` runs the model.

The chain is written once, as methods every caller uses (batch and single-case prediction, the
evaluation, the interactive session, the benchmarks): :meth:`GuidedPredictor.preprocess`
(nnU-Net's preprocessing), :meth:`~GuidedPredictor.clicks_to_preprocessed`,
:meth:`~GuidedPredictor.predict_preprocessed` (guides + nnU-Net's sliding window -> logits),
:meth:`~GuidedPredictor.segmentation_from_logits` (nnU-Net's export without writing), and
:meth:`~GuidedPredictor.predict_window` (one window, for the session's own tiling).

Outputs are written under a hidden staging name (``.<case>.partial<pid>``) and renamed into
place (``os.replace``) by the export as soon as that case is written, segmentation last. So an
interrupted or failed run leaves no partial file under a final name, every case finished before
the interruption is kept, and ``--continue_prediction`` (``overwrite=False``) predicts only the
rest.
"""
from __future__ import annotations

import copy
import functools
import glob
import inspect
import os
import re
from copy import deepcopy
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from nnunetv2.configuration import default_num_processes
from nnunetv2.inference.export_prediction import (convert_predicted_logits_to_segmentation_with_correct_shape,
                                                  export_prediction_from_logits)
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from nnunetv2.utilities.helpers import dummy_context
from nnunetv2.utilities.label_handling.label_handling import convert_labelmap_to_one_hot
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
from nnunetv2.utilities.utils import create_lists_from_splitted_dataset_folder

from ..core.clicks import Click
from ..core.encoding import guide_channel_index, render_guides
from ..paths import ensure_trainers_discoverable, trainers_visible  # noqa: F401 (ensure_...: former home)
from ..settings import ChannelLayout, GuideSettingsError, layout_from_plans, load_layout, write_json_atomic
from .click_io import (ClickSpec, ClicksByCase, as_specs, check_cases, check_labels,
                       clicks_argument, resolve_clicks, spec_to_raw)

CLICKS_RECORD = "guide_clicks.json"  # the clicks a run used, written next to its outputs


def first_conv_in_channels(state_dict: Mapping[str, torch.Tensor]) -> Optional[int]:
    """Input channels of the first convolution in a state dict (None if there is none)."""
    for k, v in state_dict.items():
        if k.endswith("weight") and isinstance(v, torch.Tensor) and v.ndim in (4, 5):
            return int(v.shape[1])
    return None


#: how torch's ``load_state_dict`` errors begin the lines that say why a checkpoint does not fit
_STATE_DICT_MISFITS = ("size mismatch", "Missing key", "Unexpected key")


def _first_error_line(e: Exception, limit: int = 300) -> str:
    """The informative line of torch's ``load_state_dict`` error (its first line only names the class)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    line = next((ln for ln in lines if ln.startswith(_STATE_DICT_MISFITS)), lines[0])
    return line if len(line) <= limit else line[:limit] + "..."


def case_id_of(first_file: str, file_ending: str) -> str:
    """nnU-Net's case identifier: the file name without ``_0000`` and the file ending."""
    return os.path.basename(first_file)[:-(len(file_ending) + 5)]


def _staging_name(final_truncated: str) -> str:
    folder, name = os.path.split(final_truncated)
    return os.path.join(folder, f".{name}.partial{os.getpid()}")


_STAGED_FILE = re.compile(r"^\.(?P<name>.+)\.partial(?P<pid>\d+)(?P<ending>\..+)$")


def _publish_staged(seg_file: str) -> None:
    """Rename a case's staged outputs (``.<case>.partial<pid><ending>`` and, with probabilities,
    its ``.npz``/``.pkl``) to their final names, the segmentation last: a final segmentation
    exists only once everything of its case is in place, which is what
    ``--continue_prediction`` checks. Files without a staging name are left alone."""
    folder, base = os.path.split(seg_file)
    m = _STAGED_FILE.match(base)
    if m is None:
        return
    staged = seg_file[:-len(m["ending"])]
    final = os.path.join(folder, m["name"])
    for suffix in (".npz", ".pkl"):
        if os.path.isfile(staged + suffix):
            os.replace(staged + suffix, final + suffix)
    os.replace(seg_file, final + m["ending"])


def _remove_stale_staging(final_truncated: str) -> None:
    """Remove staged files of ``final_truncated`` left by runs that were killed (their process is
    gone), so a continued run leaves no hidden leftovers."""
    folder, name = os.path.split(final_truncated)
    for path in glob.glob(os.path.join(glob.escape(folder or os.curdir), f".{glob.escape(name)}.partial*")):
        m = _STAGED_FILE.match(os.path.basename(path))
        if m is None or m["name"] != name or int(m["pid"]) == os.getpid():
            continue
        try:
            os.kill(int(m["pid"]), 0)
            continue  # still running (another run writing the same folder)
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        try:
            os.remove(path)
        except FileNotFoundError:
            pass


class _PublishingWriter:
    """Mixin for nnU-Net's image reader/writer: ``write_seg`` to a staging name is followed by
    :func:`_publish_staged`. Runs inside nnU-Net's export (its worker processes)."""

    def write_seg(self, seg, output_fname: str, properties: dict) -> None:
        super().write_seg(seg, output_fname, properties)
        _publish_staged(output_fname)


@functools.lru_cache(maxsize=None)
def _publishing_writer_class(base: type) -> type:
    # same name as the wrapped class: code that checks the reader/writer by name sees nnU-Net's
    return type(base.__name__, (_PublishingWriter, base), {"__qualname__": f"Publishing{base.__qualname__}"})


class PublishingPlansManager(PlansManager):
    """nnU-Net's PlansManager whose image writer renames each case's staged outputs into place as
    soon as the export has written them. It is the predictor's own plans manager (nnU-Net hands it
    to every export), so nothing in nnU-Net is patched; reading images is unchanged."""

    @property
    def image_reader_writer_class(self):
        return _publishing_writer_class(super().image_reader_writer_class)


def _output_suffixes(file_ending: str, save_probabilities: bool) -> Tuple[str, ...]:
    return (file_ending, ".npz", ".pkl") if save_probabilities else (file_ending,)


def _same_signature_as(base_method):
    """nnU-Net records a call's arguments via ``locals()`` of the names in the *bound* method's
    signature; a subclass method with an extra parameter would break that lookup. This keeps the
    visible signature the base one (the extra keyword still works)."""
    def deco(fn):
        fn.__signature__ = inspect.signature(base_method)
        return fn
    return deco


class GuidedPredictor(nnUNetPredictor):
    """nnU-Net's predictor for models trained with an nnunet_guide trainer, taking clicks.

    Use it like ``nnUNetPredictor`` (same constructor), then:

    * :meth:`predict_from_files` with ``clicks=`` a click file/folder or a dict
      ``{case_id: [ClickSpec or {"point", "label", "positive", "space"}, ...]}``;
    * :meth:`predict_case` for one image (array + properties, or files) with a list of clicks.

    Attributes:
        layout: the model's :class:`~nnunet_guide.settings.ChannelLayout` (read from
            ``guide_settings.json``, checked against plans.json and the checkpoint).
    """

    def __init__(self, tile_step_size: float = 0.5, use_gaussian: bool = True, use_mirroring: bool = True,
                 perform_everything_on_device: bool = True, device: torch.device = torch.device("cuda"),
                 verbose: bool = False, verbose_preprocessing: bool = False, allow_tqdm: bool = True):
        super().__init__(tile_step_size, use_gaussian, use_mirroring, perform_everything_on_device, device, verbose,
                         verbose_preprocessing, allow_tqdm)
        self.layout: Optional[ChannelLayout] = None
        self._run_clicks: ClicksByCase = {}
        self._ofile_case: Dict[str, str] = {}
        self._fold_predictors: Optional[List[nnUNetPredictor]] = None

    # ---- model ----------------------------------------------------------------------------
    def initialize_from_trained_model_folder(self, model_training_output_dir: str,
                                             use_folds: Union[Tuple[Union[int, str]], None],
                                             checkpoint_name: str = "checkpoint_final.pth"):
        """nnU-Net's initialisation, plus: read the layout, refuse models without guide channels,
        check every fold's first convolution against the layout."""
        layout = load_layout(model_training_output_dir)
        self._require_guides(layout, model_training_output_dir)
        self._fold_predictors = None
        try:
            with trainers_visible():  # nnU-Net looks the trainer up by name (nnUNet_extTrainer)
                super().initialize_from_trained_model_folder(model_training_output_dir, use_folds, checkpoint_name)
        except RuntimeError as e:
            if not any(k in str(e) for k in _STATE_DICT_MISFITS):
                raise
            entry = f", guides entering {layout.guide.guide_entry!r}" if layout.guide is not None else ""
            raise GuideSettingsError(
                f"{model_training_output_dir}: the checkpoint {checkpoint_name} does not fit the network its "
                f"plans.json / guide_settings.json describe ({layout.num_channels} input "
                f"channels: {layout.num_image_channels} image + {len(layout.guide_channel_indices)} guide + "
                f"{layout.num_extra_channels - len(layout.guide_channel_indices)} computed{entry}). Restore the "
                f"files written at training time. ({_first_error_line(e)})") from e
        self._set_layout(layout, f"{model_training_output_dir} ({checkpoint_name})")

    def manual_initialization(self, network, plans_manager, configuration_manager, parameters, dataset_json,
                              trainer_name, inference_allowed_mirroring_axes, layout: Optional[ChannelLayout] = None):
        """nnU-Net's manual initialisation; the layout defaults to the one stored in the plans."""
        self._fold_predictors = None
        super().manual_initialization(network, plans_manager, configuration_manager, parameters, dataset_json,
                                      trainer_name, inference_allowed_mirroring_axes)
        layout = layout if layout is not None else layout_from_plans(
            plans_manager.plans, source="the plans given to manual_initialization")
        if layout is None:
            raise GuideSettingsError("the plans carry no nnunet_guide layout and none was given: this network was "
                                     "not built by an nnunet_guide trainer")
        self._require_guides(layout, "manual initialization")
        self._set_layout(layout, "manual initialization")

    @staticmethod
    def _require_guides(layout: ChannelLayout, source: str) -> None:
        if layout.guide is None or not layout.guide_channel_indices:
            raise GuideSettingsError(
                f"{source}: this model has no guide channels (its layout has {layout.num_channels} channels: "
                f"{[c['kind'] for c in layout.channels]}); it cannot take clicks. Predict with nnUNetv2_predict.")

    def _set_layout(self, layout: ChannelLayout, source: str) -> None:
        n_img, guide_idx = layout.num_image_channels, layout.guide_channel_indices
        if guide_idx != list(range(n_img, n_img + len(guide_idx))):
            raise GuideSettingsError(f"{source}: guide channels {guide_idx} do not follow the {n_img} image channels")
        for t in range(len(layout.targets)):
            for positive in ((True, False) if layout.guide.negatives else (True,)):
                if layout.guide_channel(t, positive) != n_img + guide_channel_index(t, positive, layout.guide.negatives):
                    raise GuideSettingsError(f"{source}: guide channel order of the layout differs from the renderer's")
        for i, params in enumerate(self.list_of_parameters or []):
            c = first_conv_in_channels(params)
            if c is not None and c != layout.num_channels:
                raise GuideSettingsError(
                    f"{source}: checkpoint {i} has a first convolution with {c} input channels, but the guide "
                    f"settings describe {layout.num_channels} channels ({n_img} image + {len(guide_idx)} guide + "
                    f"{layout.num_channels - n_img - len(guide_idx)} computed). The settings file does not belong "
                    f"to this checkpoint.")
        fed = getattr(self.network, "num_fed_channels", None)
        if fed is None and hasattr(self.network, "_orig_mod"):
            fed = getattr(self.network._orig_mod, "num_fed_channels", None)
        if fed != n_img + len(guide_idx):
            raise GuideSettingsError(
                f"{source}: the network built by trainer {self.trainer_name!r} does not take guide channels "
                f"(expected an ExtraChannelNetwork feeding {n_img + len(guide_idx)} channels, got "
                f"{type(self.network).__name__})")
        self.layout = layout
        if not isinstance(self.plans_manager, PublishingPlansManager):
            self.plans_manager = PublishingPlansManager(self.plans_manager.plans)

    # ---- guides -----------------------------------------------------------------------------
    @property
    def is_2d(self) -> bool:
        return len(self.configuration_manager.patch_size) == 2

    @property
    def slice_axis(self) -> Optional[int]:
        """Axis of the preprocessed volume a 2D configuration slices along (0), None for 3D."""
        return 0 if self.is_2d else None

    def guide_spacing(self, properties: Mapping) -> Tuple[float, ...]:
        """Voxel size (mm) of the preprocessed grid per axis, as the trainer rendered guides."""
        spacing = [float(s) for s in self.configuration_manager.spacing]
        if self.is_2d:
            spacing = [float(properties["spacing"][self.plans_manager.transpose_forward[0]])] + spacing
        return tuple(spacing)

    def clicks_to_preprocessed(self, specs: Sequence[ClickSpec], case: str, properties: Mapping,
                               preprocessed_shape: Sequence[int]) -> List[Click]:
        """Map a case's clicks (as given) into the preprocessed grid; labels resolved to targets."""
        return resolve_clicks(specs, self.layout, case, properties, self.plans_manager.transpose_forward,
                              preprocessed_shape)

    def render_guides(self, clicks: Sequence[Click], preprocessed_shape: Sequence[int],
                      properties: Mapping) -> np.ndarray:
        """Guide channels (n_guide, *preprocessed_shape), float32, for clicks in preprocessed space."""
        return render_guides(clicks, preprocessed_shape, self.guide_spacing(properties), self.layout.guide,
                             len(self.layout.targets), slice_axis=self.slice_axis)

    def add_guides(self, data: torch.Tensor, clicks: Sequence[Click], properties: Mapping) -> torch.Tensor:
        """Append guide channels to preprocessed data (C, *spatial); no clicks -> data unchanged."""
        if self.layout is None:
            raise RuntimeError("initialize the predictor first (initialize_from_trained_model_folder)")
        if data.shape[0] != self.layout.num_image_channels:
            raise GuideSettingsError(
                f"preprocessed data has {data.shape[0]} channels; the model takes "
                f"{self.layout.num_image_channels} image channels before the guides")
        if not clicks:
            return data
        guides = torch.from_numpy(self.render_guides(clicks, data.shape[1:], properties))
        return torch.cat((data, guides.to(data.dtype)), dim=0)

    # ---- the prediction chain --------------------------------------------------------------
    def predict_preprocessed(self, data: torch.Tensor, properties: Mapping, clicks: Sequence[Click]) -> torch.Tensor:
        """Preprocessed case + clicks -> logits: guide channels appended (:meth:`add_guides`), then
        nnU-Net's sliding window, Gaussian blending, mirroring and fold average.

        Args:
            data: (C, *preprocessed_shape) from :meth:`preprocess`; properties: its properties.
            clicks: in preprocessed coordinates (:meth:`clicks_to_preprocessed`).
        Returns:
            logits (K, *preprocessed_shape), float, on the CPU.
        """
        return self.predict_logits_from_preprocessed_data(self.add_guides(data, clicks, properties)).cpu()

    def segmentation_from_logits(self, logits: torch.Tensor, properties: Mapping,
                                 return_probabilities: bool = False):
        """nnU-Net's export without writing: logits of the preprocessed grid -> segmentation (and
        probabilities) in the input array's order (z, y, x)."""
        return convert_predicted_logits_to_segmentation_with_correct_shape(
            logits, self.plans_manager, self.configuration_manager, self.label_manager, deepcopy(dict(properties)),
            return_probabilities=return_probabilities)

    def fold_predictors(self) -> List[nnUNetPredictor]:
        """One view of this predictor per fold, each with its own network holding that fold's
        weights (built once; one fold uses this predictor itself). nnU-Net's own
        :meth:`predict_logits_from_preprocessed_data` reloads the weights per call instead."""
        if self._fold_predictors is None:
            params = self.list_of_parameters or [None]
            views = []
            for prm in params:
                view = self if len(params) == 1 else copy.copy(self)
                if len(params) > 1:
                    view.network = copy.deepcopy(self.network)
                if prm:
                    view.network.load_state_dict(prm)
                view.network.to(self.device).eval()
                views.append(view)
            self._fold_predictors = views
        return self._fold_predictors

    @torch.inference_mode()
    def predict_window(self, x: torch.Tensor) -> torch.Tensor:
        """The network output of one sliding-window patch as nnU-Net's sliding window computes it
        (test-time mirroring if enabled, autocast on CUDA), averaged over folds.

        Args:
            x: (C, *patch) image + guide channels of the window (any device).
        Returns:
            (K, *patch) float32 on the predictor's device.
        """
        x = x[None].to(self.device)
        folds = self.fold_predictors()
        out = None
        with torch.autocast(self.device.type, enabled=True) if self.device.type == "cuda" else dummy_context():
            for view in folds:
                y = view._internal_maybe_mirror_and_predict(x)[0].float()
                out = y if out is None else out + y
        out /= len(folds)
        return out

    # ---- click bookkeeping for file runs --------------------------------------------------------
    def _input_lists(self, list_of_lists_or_source_folder) -> List[List[str]]:
        if isinstance(list_of_lists_or_source_folder, str):
            return create_lists_from_splitted_dataset_folder(list_of_lists_or_source_folder,
                                                             self.dataset_json["file_ending"])
        return [list(x) for x in list_of_lists_or_source_folder]

    def prepare_clicks(self, list_of_lists_or_source_folder, clicks) -> ClicksByCase:
        """Read and check a run's clicks before anything is predicted or written.

        Checks: every case id is among the inputs, every label is a guided class of the model,
        negative clicks have a channel, and (for images SimpleITK can read a header of) every
        click lies inside its image. Raises :class:`ClickFileError` naming file, case and value.
        """
        source = os.fspath(clicks) if isinstance(clicks, (str, os.PathLike)) else "clicks argument"
        specs = clicks_argument(clicks)
        if not specs:
            return {}
        lists = self._input_lists(list_of_lists_or_source_folder)
        fe = self.dataset_json["file_ending"]
        files_of = {case_id_of(li[0], fe): li for li in lists}
        check_cases(specs, files_of, source)
        check_labels(specs, self.layout)
        for case, case_specs in specs.items():
            if case_specs:
                self._check_inside_from_header(files_of[case][0], case_specs, case)
        return specs

    def _check_inside_from_header(self, image_file: str, specs: Sequence[ClickSpec], case: str) -> None:
        """Early out-of-image check from the image header (skipped where SimpleITK can't read it or
        nnU-Net's reader reorients; the full check runs again after preprocessing)."""
        if self.plans_manager.image_reader_writer_class.__name__ != "SimpleITKIO":
            return
        import SimpleITK as sitk
        from ..core.coords import ImageGeometry
        try:
            reader = sitk.ImageFileReader()
            reader.SetFileName(image_file)
            reader.ReadImageInformation()
        except RuntimeError:
            return
        size = reader.GetSize()
        if len(size) not in (2, 3):
            return
        geometry = ImageGeometry.from_sitk_params(reader.GetSpacing(), reader.GetOrigin(), reader.GetDirection(),
                                                  size)
        raw_shape = tuple(size[::-1]) if len(size) == 3 else (1, *size[::-1])
        for s in specs:
            spec_to_raw(s, geometry, raw_shape, case)

    def _manage_input_and_output_lists(self, *args, **kwargs):
        lists, outs, prev = super()._manage_input_and_output_lists(*args, **kwargs)
        if outs is not None:
            fe = self.dataset_json["file_ending"]
            for li, of in zip(lists, outs):
                self._ofile_case[of] = case_id_of(li[0], fe)
        return lists, outs, prev

    def _record_clicks(self, output_folder: Optional[str], specs: ClicksByCase) -> None:
        if output_folder is not None and specs:
            write_json_atomic({k: [c.to_dict() for c in v] for k, v in specs.items()},
                              os.path.join(output_folder, CLICKS_RECORD))

    # ---- batch prediction --------------------------------------------------------------------
    @_same_signature_as(nnUNetPredictor.predict_from_files)
    def predict_from_files(self, list_of_lists_or_source_folder: Union[str, List[List[str]]],
                           output_folder_or_list_of_truncated_output_files: Union[str, None, List[str]],
                           save_probabilities: bool = False, overwrite: bool = True,
                           num_processes_preprocessing: int = default_num_processes,
                           num_processes_segmentation_export: int = default_num_processes,
                           folder_with_segs_from_prev_stage: str = None, num_parts: int = 1, part_id: int = 0,
                           clicks=None):
        """nnU-Net's batch prediction with clicks.

        Args:
            clicks: None (all cases automatic), a click file or folder (see
                :mod:`~nnunet_guide.inference.click_io`), or ``{case_id: [click, ...]}``. Cases
                without clicks are predicted automatically.
            (other arguments as ``nnUNetPredictor.predict_from_files``)
        """
        specs = self.prepare_clicks(list_of_lists_or_source_folder, clicks)
        self._run_clicks, self._ofile_case = specs, {}
        try:
            ret = super().predict_from_files(
                list_of_lists_or_source_folder, output_folder_or_list_of_truncated_output_files, save_probabilities,
                overwrite, num_processes_preprocessing, num_processes_segmentation_export,
                folder_with_segs_from_prev_stage, num_parts, part_id)
        finally:
            self._run_clicks, self._ofile_case = {}, {}
        self._record_clicks(self._output_folder(output_folder_or_list_of_truncated_output_files), specs)
        return ret

    @staticmethod
    def _output_folder(output) -> Optional[str]:
        if isinstance(output, str):
            return output
        if isinstance(output, list) and output:
            return os.path.dirname(output[0]) or os.curdir
        return None

    def _guided_items(self, data_iterator: Iterable[dict], staged: List[Tuple[str, str]]):
        """Yield nnU-Net's preprocessed items with guide channels appended and output names
        replaced by staging names (recorded in ``staged``)."""
        for item in data_iterator:
            item = dict(item)
            data = item["data"]
            if isinstance(data, str):  # nnU-Net may hand large arrays over as .npy files
                path = data
                data = torch.from_numpy(np.load(path))
                os.remove(path)
            ofile = item.get("ofile")
            case = item.get("case_id") or (self._ofile_case.get(ofile) if ofile is not None else None)
            specs = item.get("clicks")
            if specs is None:
                specs = self._run_clicks.get(case, []) if case is not None else []
            clicks = self.clicks_to_preprocessed(specs, case or "case", item["data_properties"], data.shape[1:])
            item["data"] = self.add_guides(data, clicks, item["data_properties"])
            if self.verbose:
                print(f"{case}: {len(specs)} click(s)")
            if ofile is not None:
                _remove_stale_staging(ofile)
                tmp = _staging_name(ofile)
                staged.append((tmp, ofile))
                item["ofile"] = tmp
            yield item

    def predict_from_data_iterator(self, data_iterator, save_probabilities: bool = False,
                                   num_processes_segmentation_export: int = default_num_processes):
        """nnU-Net's loop over preprocessed items, with guides appended and atomic outputs.

        Each case is exported under a staging name and renamed into place by the export as soon
        as it is written (:class:`PublishingPlansManager`), so an interrupted run keeps every
        finished case for ``--continue_prediction``. Items may carry ``"clicks"`` (a list of
        ClickSpec) and ``"case_id"``; otherwise the clicks of the current
        :meth:`predict_from_files` run are looked up by output file.
        """
        staged: List[Tuple[str, str]] = []
        suffixes = _output_suffixes(self.dataset_json["file_ending"], save_probabilities)
        try:
            ret = super().predict_from_data_iterator(self._guided_items(data_iterator, staged), save_probabilities,
                                                     num_processes_segmentation_export)
        except BaseException:
            for tmp, _ in staged:
                for s in suffixes:
                    if os.path.isfile(tmp + s):
                        os.remove(tmp + s)
            raise
        finally:
            if hasattr(data_iterator, "_finish"):
                data_iterator._finish()
        for tmp, final in staged:  # only where the plans manager was replaced after initialisation
            if os.path.isfile(tmp + self.dataset_json["file_ending"]):
                _publish_staged(tmp + self.dataset_json["file_ending"])
        return ret

    def predict_from_files_sequential(self, list_of_lists_or_source_folder: Union[str, List[List[str]]],
                                      output_folder_or_list_of_truncated_output_files: Union[str, None, List[str]],
                                      save_probabilities: bool = False, overwrite: bool = True,
                                      folder_with_segs_from_prev_stage: str = None, clicks=None):
        """Like :meth:`predict_from_files` without worker processes (nnU-Net's ``-npp 0 -nps 0``).
        Each case's output is renamed into place as soon as it is written."""
        specs = self.prepare_clicks(list_of_lists_or_source_folder, clicks)
        output_folder = self._output_folder(output_folder_or_list_of_truncated_output_files)
        if output_folder is not None:
            os.makedirs(output_folder, exist_ok=True)
            write_json_atomic(self.dataset_json, os.path.join(output_folder, "dataset.json"))
            write_json_atomic(self.plans_manager.plans, os.path.join(output_folder, "plans.json"))
        lists, outs, prev = super()._manage_input_and_output_lists(
            list_of_lists_or_source_folder, output_folder_or_list_of_truncated_output_files,
            folder_with_segs_from_prev_stage, overwrite, 0, 1, save_probabilities)
        if self.configuration_manager.previous_stage_name is not None and folder_with_segs_from_prev_stage is None:
            raise ValueError(f"configuration {self.configuration_manager.previous_stage_name!r} is a cascade stage: "
                             f"give folder_with_segs_from_prev_stage")
        fe = self.dataset_json["file_ending"]
        ret = []
        for i, files in enumerate(lists):
            case = case_id_of(files[0], fe)
            out = self.predict_case(files, clicks=specs.get(case, []), case_id=case,
                                    output_file_truncated=outs[i] if outs is not None else None,
                                    save_or_return_probabilities=save_probabilities,
                                    seg_from_prev_stage=prev[i] if prev is not None else None)
            ret.append(out)
        self._record_clicks(output_folder, specs)
        return ret

    # ---- single cases -------------------------------------------------------------------------
    def preprocess(self, image: Union[str, Sequence[str], np.ndarray], properties: Optional[dict] = None,
                   seg_from_prev_stage: Union[None, str, np.ndarray] = None) -> Tuple[torch.Tensor, dict]:
        """nnU-Net's preprocessing of one case.

        Args:
            image: file name(s) of the case's channels, or an array (C, z, y, x) / (z, y, x) as
                nnU-Net's reader returns it.
            properties: for arrays: at least ``{"spacing": [sz, sy, sx]}`` (add ``sitk_stuff``
                for physical clicks), as the reader returns them.
        Returns:
            (data (C, *preprocessed_shape) float32 tensor, preprocessed properties).
        """
        pre = self.configuration_manager.preprocessor_class(verbose=self.verbose_preprocessing)
        if isinstance(image, (str, os.PathLike)):
            image = [os.fspath(image)]
        if isinstance(image, (list, tuple)):
            prev = seg_from_prev_stage if isinstance(seg_from_prev_stage, str) else None
            data, seg, props = pre.run_case(list(image), prev, self.plans_manager, self.configuration_manager,
                                            self.dataset_json)
        else:
            arr = np.asarray(image)
            if arr.ndim == 3:
                arr = arr[None]
            if properties is None or "spacing" not in properties:
                raise ValueError("an image array needs properties with 'spacing' (z, y, x order, as nnU-Net's "
                                 "reader returns them)")
            prev = seg_from_prev_stage
            if prev is not None and prev.ndim == arr.ndim - 1:
                prev = prev[None]
            data, seg, props = pre.run_case_npy(arr, prev, deepcopy(dict(properties)), self.plans_manager,
                                                self.configuration_manager, self.dataset_json)
        if seg_from_prev_stage is not None:
            lm = self.plans_manager.get_label_manager(self.dataset_json)
            data = np.vstack((data, convert_labelmap_to_one_hot(seg[0], lm.foreground_labels, data.dtype)))
        return torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32)), props

    def predict_case(self, image: Union[str, Sequence[str], np.ndarray], properties: Optional[dict] = None,
                     clicks=None, case_id: str = "case", output_file_truncated: Optional[str] = None,
                     save_or_return_probabilities: bool = False, seg_from_prev_stage=None):
        """Predict one case with clicks.

        Args:
            image, properties: as in :meth:`preprocess`.
            clicks: list of ``ClickSpec`` or dicts ``{"point", "label", "positive", "space"}``
                (physical LPS mm or ITK voxel index; see click_io). None/empty = automatic.
            output_file_truncated: write ``<this><file_ending>`` (atomically) instead of returning.
        Returns:
            None when writing; otherwise the segmentation (z, y, x) in the input's array order
            (and the probabilities (K, z, y, x) when ``save_or_return_probabilities``).
        """
        specs = as_specs(clicks, "clicks", case_id)
        check_labels({case_id: specs}, self.layout)
        data, props = self.preprocess(image, properties, seg_from_prev_stage)
        logits = self.predict_preprocessed(data, props, self.clicks_to_preprocessed(specs, case_id, props,
                                                                                    data.shape[1:]))
        if output_file_truncated is None:
            return self.segmentation_from_logits(logits, props, save_or_return_probabilities)
        tmp = _staging_name(output_file_truncated)
        suffixes = _output_suffixes(self.dataset_json["file_ending"], save_or_return_probabilities)
        os.makedirs(os.path.dirname(os.path.abspath(output_file_truncated)), exist_ok=True)
        _remove_stale_staging(output_file_truncated)
        try:  # the export's writer renames the staged files into place (PublishingPlansManager)
            export_prediction_from_logits(logits, props, self.configuration_manager, self.plans_manager,
                                          self.dataset_json, tmp, save_or_return_probabilities)
            if os.path.isfile(tmp + self.dataset_json["file_ending"]):
                _publish_staged(tmp + self.dataset_json["file_ending"])
        finally:
            for s in suffixes:
                if os.path.isfile(tmp + s):
                    os.remove(tmp + s)
        return None

"""``nnUNetv2_predict_guided``: ``nnUNetv2_predict`` plus ``--clicks FILE``.

All of nnU-Net's options (``-i -o -d -c -tr -p -f -chk -device --disable_tta -step_size -npp
-nps -num_parts -part_id --save_probabilities --continue_prediction ...``) are nnU-Net's own: this
command takes ``--clicks`` off the command line and runs nnU-Net's own entry point
(``predict_entry_point``, or ``predict_entry_point_modelfolder`` when ``-m MODEL_FOLDER`` is
given) with :class:`~nnunet_guide.inference.predictor.GuidedPredictor` in place of
``nnUNetPredictor``. So option names, defaults and behaviour follow the installed nnU-Net.

Cases without clicks are predicted automatically. Bad clicks (unknown case or label, a point
outside its image, a malformed file) stop the run before anything is written.
"""
from __future__ import annotations

import argparse
import sys
from contextlib import contextmanager
from typing import List, Optional

from ..inference.click_io import ClickFileError
from ..settings import GuideSettingsError

USAGE_NOTE = """\
nnUNetv2_predict_guided: nnUNetv2_predict with clicks.

  --clicks FILE   clicks per case: nnunet_guide JSON ({"case_id": [{"point": [x, y, z],
                  "label": "tumor" or 2, "positive": true, "space": "physical" or "voxel"}]}),
                  a 3D Slicer markups file (<case_id>.mrk.json), a MONAI Label style file
                  ({"tumor": [[i, j, k], ...], "background": [...]}), or a folder of such files.
                  Physical points are mm in ITK/LPS as SimpleITK reports; voxel points are the
                  ITK index (i, j, k). Cases without clicks are predicted automatically.
                  UTF-8 JSON, at most 10,000 clicks per case.
  -m FOLDER       use a model folder directly (nnUNetv2_predict_from_modelfolder's options)

All other options are nnUNetv2_predict's (shown below).
"""


@contextmanager
def _guided_entry_point(clicks: Optional[str]):
    """nnU-Net's prediction module with GuidedPredictor (bound to ``clicks``) as its predictor.

    nnU-Net's entry points build their predictor by the module-level name ``nnUNetPredictor`` and
    offer no parameter for another class, so that name is swapped for the duration of the call
    and restored afterwards (reusing nnU-Net's entry point keeps every option and default its own
    instead of a copy of its argument parser)."""
    import nnunetv2.inference.predict_from_raw_data as nnunet_predict
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from ..inference.predictor import GuidedPredictor, _same_signature_as

    class CommandLineGuidedPredictor(GuidedPredictor):
        @_same_signature_as(nnUNetPredictor.predict_from_files)
        def predict_from_files(self, *args, **kwargs):
            kwargs.setdefault("clicks", clicks)
            return super().predict_from_files(*args, **kwargs)

        def predict_from_files_sequential(self, *args, **kwargs):
            kwargs.setdefault("clicks", clicks)
            return super().predict_from_files_sequential(*args, **kwargs)

    original = nnunet_predict.nnUNetPredictor
    nnunet_predict.nnUNetPredictor = CommandLineGuidedPredictor
    try:
        yield nnunet_predict
    finally:
        nnunet_predict.nnUNetPredictor = original


def main(argv: Optional[List[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--clicks", type=str, default=None)
    known, rest = pre.parse_known_args(argv)
    if "-h" in rest or "--help" in rest:
        print(USAGE_NOTE)
    prog = "nnUNetv2_predict_guided"
    with _guided_entry_point(known.clicks) as nnunet_predict:
        entry = nnunet_predict.predict_entry_point_modelfolder if "-m" in rest else nnunet_predict.predict_entry_point
        # nnU-Net's entry points parse sys.argv and take no argument list: swapped for the call only
        saved = sys.argv
        sys.argv = [prog, *rest]
        try:
            entry()
        except (ClickFileError, GuideSettingsError) as e:
            print(f"{prog}: error: {e}", file=sys.stderr)
            raise SystemExit(2)
        finally:
            sys.argv = saved


if __name__ == "__main__":
    main()

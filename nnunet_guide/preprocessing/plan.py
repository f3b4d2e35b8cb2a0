"""Former name of :mod:`nnunet_guide.preprocessing.density_plans` (kept for imports); the
command ``nnUNetv2_guide_plan`` is :mod:`nnunet_guide.cli.plan`."""
from .density_plans import PLANS_DENSITY_KEY, compute_histograms, plan_density  # noqa: F401

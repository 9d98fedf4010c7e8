"""Every distillation method, one file each; importing this package registers them all.

Adding a method is its file (a :class:`~clipdistill.distill.base.DistillMethod` subclass with
its metadata, decorated with ``@register_method``) and one import line below. Registration
order is the order the demo trains and the report lists them: the baseline first, then by
increasing use of the teachers.

The registry's functions are re-exported here so that a caller gets them together with every
method registered; the registry module itself imports no method.
"""

# The registration order (kept as written: import sorting is off for these lines).
# isort: off
from clipdistill.distill.methods import clip  # noqa: F401
from clipdistill.distill.methods import openclip  # noqa: F401
from clipdistill.distill.methods import clipkd  # noqa: F401
from clipdistill.distill.methods import conaclip  # noqa: F401
from clipdistill.distill.methods import mcad  # noqa: F401
from clipdistill.distill.methods import dcd  # noqa: F401
from clipdistill.distill.methods import comkd  # noqa: F401
# isort: on

from clipdistill.distill.registry import (
    baseline_method,
    fusion_methods,
    get_method,
    list_methods,
    method_summaries,
    method_variants,
    register_method,
    resolve_method_entry,
    tuned_method_args,
)

__all__ = [
    "baseline_method",
    "fusion_methods",
    "get_method",
    "list_methods",
    "method_summaries",
    "method_variants",
    "register_method",
    "resolve_method_entry",
    "tuned_method_args",
]

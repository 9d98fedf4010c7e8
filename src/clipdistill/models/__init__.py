"""Models: spec parsing, the teacher kinds, the loaders and the networks.

Importing the package registers every teacher kind (:mod:`clipdistill.models.teacher_kinds`,
the timm pattern: the package imports the entries, the registry in ``kinds.py`` imports none),
so any ``clipdistill.models`` module sees the whole table. The entries import their networks
inside functions, so this stays cheap (no torch).
"""

from clipdistill.models import teacher_kinds  # noqa: F401  (registers the kinds)

"""The base class of every error that is the user's to fix, not a bug.

A bad config key, dataset, model spec, method argument or demo request raises a subclass of
:class:`UserError` whose message names the file, key or value at fault. The command line
(``cli/common.py``) catches this one base, prints the message on one line and exits with
status 2 instead of a traceback; anything else is a bug and keeps its traceback.

:class:`UserError` is a marker beside each error's own built-in base, which stays what it was
(``class ConfigError(UserError, ValueError)``, ``class DeviceError(UserError, RuntimeError)``):
code that catches ``ValueError`` or ``RuntimeError`` sees exactly the errors it saw before.
"""

from __future__ import annotations


class UserError(Exception):
    """A mistake in what was asked for; the message names what to change."""

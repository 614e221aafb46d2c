"""Plug-ins by import path: a problem, judge or partner of the user's own, named ``pkg.module:attr``.

Why import paths and not registration: a problem, its judge and its partner are built in every
process that plays conversations - each rollout worker, evaluation's pool, the driver's checks - and
those are other processes, on a cluster other machines. A decorator (``@register_problem``) fills a
dict only in the process that ran it; an import path is resolved by each process on its own, from
its own Python path: an installed package, ``PYTHONPATH`` (a local cluster's workers inherit the
driver's environment), or a Ray job's ``--working-dir``.

The driver resolves and checks every plug-in before any process starts (``ppg.env.factory.
check_environment``), so a typo fails in a second, naming the field, instead of inside a worker after
its engine loaded. What a plug-in must provide is checked, not assumed: the interface here is the
one the conversation loop calls (``ppg.env.conversation.run_conversations``).
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from typing import Any

from ppg.config import ConfigError, is_import_path

PATH_HELP = (
    "the module must be importable in every ppg process: install it, put its folder on PYTHONPATH "
    "(PYTHONPATH=my_plugins ppg train ...), or on a cluster ship it with "
    "`ray job submit --working-dir DIR`"
)


class PluginError(ConfigError):
    """A plug-in that cannot be imported or lacks the interface its field needs (a ``ConfigError``:
    ``ppg`` exits 2 with the message before anything starts)."""


def import_object(field: str, path: str) -> Any:
    """The object named ``pkg.module:attr`` (``attr`` may be dotted: ``Outer.Inner``); errors name
    ``field``, the part that failed and the fix."""
    if not is_import_path(path):
        raise PluginError(f"{field}: {path!r} is not an import path; write pkg.module:Name")
    module_name, _, attr = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name is not None and (module_name + ".").startswith(e.name + "."):
            raise PluginError(
                f"{field}={path}: no module named {e.name!r} on this process's Python path; {PATH_HELP}"
            ) from None
        raise PluginError(  # the plug-in was found, but something it imports was not
            f"{field}={path}: module {module_name!r} was found but importing it failed: {e}; "
            f"install what it imports"
        ) from e
    except Exception as e:  # noqa: BLE001 - any error in the user's module is reported as that
        raise PluginError(
            f"{field}={path}: importing module {module_name!r} raised {type(e).__name__}: {e}; fix the module"
        ) from e
    obj: Any = module
    for i, part in enumerate(attr.split(".")):
        if not hasattr(obj, part):
            where = module_name if i == 0 else f"{module_name}:{'.'.join(attr.split('.')[:i])}"
            raise PluginError(
                f"{field}={path}: {where!r} has no attribute {part!r}; define it there or fix the "
                f"name after ':'"
            )
        obj = getattr(obj, part)
    return obj


def check_factory(field: str, path: str, factory: Any, methods: tuple[str, ...]) -> Callable[[], Any]:
    """``factory`` as a zero-argument callable whose result has ``methods``: a class is checked for
    them without being built (building may be costly: a model to load); a function is checked to be
    callable without arguments, and its result is checked when it is called (``build``)."""
    if not callable(factory):
        raise PluginError(
            f"{field}={path}: a {type(factory).__name__} is not callable; give a class or a function "
            f"that takes no arguments and returns an object with {_names(methods)}"
        )
    if isinstance(factory, type):
        missing = [m for m in methods if not callable(getattr(factory, m, None))]
        if missing:
            raise PluginError(
                f"{field}={path}: class {factory.__name__} has no method {_names(tuple(missing))}; "
                f"it must define {_names(methods)} (see ppg/env/judges.py, ppg/env/partners.py)"
            )
    try:
        inspect.signature(factory).bind()
    except TypeError as e:
        raise PluginError(
            f"{field}={path}: ppg calls it without arguments, but {e}; give every parameter a default"
        ) from None
    except ValueError:  # no signature to inspect (some builtins): calling it will tell
        pass
    return factory


def build(field: str, path: str, factory: Callable[[], Any], methods: tuple[str, ...]) -> Any:
    """Call a checked factory and check that what it returned has ``methods``."""
    obj = factory()
    missing = [m for m in methods if not callable(getattr(obj, m, None))]
    if missing:
        raise PluginError(
            f"{field}={path}: what it returned ({type(obj).__name__}) has no {_names(tuple(missing))}; "
            f"the result must have {_names(methods)}"
        )
    return obj


def _names(methods: tuple[str, ...]) -> str:
    return " and ".join(f"{m}()" for m in methods)

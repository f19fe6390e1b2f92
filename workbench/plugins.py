"""Plugins: a user's own ops (``register_op``) and passes (``register_pass``) in a module that every command loads.

A plugin is a Python module or file whose import registers what it adds. It is loaded

  * by ``--plugin MODULE_OR_FILE`` on any ``workbench`` command (repeatable), or ``load_plugins([...])`` in Python;
  * by the ``WORKBENCH_PLUGINS`` environment variable (module names or files, separated by commas);
  * by an installed package that declares an entry point in the group ``workbench.plugins``
    (``[project.entry-points."workbench.plugins"] myops = "myops.workbench"`` in its pyproject.toml).

An engine records the plugins its build loaded (``plugins`` in manifest.json), and loading it loads them again,
so ``workbench serve ENGINE`` runs a plugin's ops without being told.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from importlib.metadata import entry_points
from pathlib import Path

from .errors import WorkbenchError

ENTRY_POINT_GROUP = "workbench.plugins"
ENV_VAR = "WORKBENCH_PLUGINS"

#: spec (a module name, or a file's resolved path) -> the module it loaded, in load order
LOADED: dict[str, object] = {}


def load_plugin(spec: str) -> str:
    """Import plugin ``spec`` (a module name or a ``.py`` file) once; returns the spec as recorded (a file's
    resolved path). A plugin that cannot be found or fails to import raises one WorkbenchError line."""
    spec = str(spec).strip()
    is_file = spec.endswith(".py") or os.sep in spec
    key = str(Path(spec).expanduser().resolve()) if is_file else spec
    if key in LOADED:
        return key
    if is_file and not Path(key).is_file():
        raise WorkbenchError(f"plugin {spec}: no such file; give a .py file or an importable module name")
    try:
        if is_file:
            path = Path(key)
            name = f"workbench_plugin_{path.stem}"
            module_spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[name] = module
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(spec)
    except WorkbenchError as e:  # the plugin's own registration refused (a name taken, a place unknown)
        raise WorkbenchError(f"plugin {spec}: {e}") from None
    except ModuleNotFoundError as e:
        raise WorkbenchError(f"plugin {spec}: {e}; install it, or give the path of its .py file") from None
    except Exception as e:  # noqa: BLE001 - a user's module: whatever it raises, say where
        raise WorkbenchError(f"plugin {spec} failed to import ({type(e).__name__}: {e})") from None
    LOADED[key] = module
    return key


def load_plugins(specs=(), *, environment: bool = True, installed: bool = True) -> list[str]:
    """Load ``specs``, then (unless turned off) those in ``WORKBENCH_PLUGINS`` and the installed packages'
    ``workbench.plugins`` entry points. Returns the specs loaded by this call and before it, in order."""
    for spec in specs or ():
        load_plugin(spec)
    if environment:
        for spec in filter(None, (s.strip() for s in os.environ.get(ENV_VAR, "").split(","))):
            load_plugin(spec)
    if installed:
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            if ep.module in LOADED:
                continue
            try:
                ep.load()
                LOADED[ep.module] = sys.modules[ep.module]
            except Exception as e:  # noqa: BLE001
                raise WorkbenchError(f"plugin {ep.name} ({ep.value}, an installed {ENTRY_POINT_GROUP} entry point) "
                                     f"failed to import ({type(e).__name__}: {e})") from None
    return loaded()


def loaded() -> list[str]:
    """The plugins loaded in this process, in order (what an exported engine records)."""
    return list(LOADED)

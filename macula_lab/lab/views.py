"""Views of a lab (widgets), found by name as plug-ins: the lab never imports them.

The widgets sit above the lab (they read its samples and call its nodes), so
``lab.dashboard()`` cannot import them without an import loop.  Instead a
package registers view factories under the ``macula_lab.views`` entry-point
group (this package's own ``dashboard`` is declared in ``pyproject.toml``), and
:func:`open_view` loads one by name.  A new view is a callable ``(lab, **kw)``
and one line in a ``pyproject.toml``.
"""

from __future__ import annotations

from importlib.metadata import entry_points
from typing import Any

from ..errors import MaculaError

GROUP = "macula_lab.views"


class ViewNotAvailable(MaculaError):
    """No view of that name is installed (the widgets need the ``notebook`` extra)."""

    code = "view_not_available"


def open_view(name: str, lab: Any, **options: Any) -> Any:
    """Build view ``name`` for ``lab`` (see the module docstring)."""
    found = entry_points(group=GROUP, name=name)
    if not found:
        known = sorted(ep.name for ep in entry_points(group=GROUP))
        raise ViewNotAvailable(
            f"no view {name!r} is installed (known: {known or 'none'}); "
            "install the package with its notebook extra: pip install 'macula-lab[notebook]'"
        )
    try:
        factory = next(iter(found)).load()
    except ImportError as exc:  # declared, but its dependencies (ipywidgets, plotly) are missing
        raise ViewNotAvailable(
            f"view {name!r} needs the notebook extra: pip install 'macula-lab[notebook]' ({exc})"
        ) from exc
    return factory(lab, **options)

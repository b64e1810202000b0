"""Output capture in the site kernel: pandas, matplotlib and statsmodels displays become structured.

:class:`Capture` hooks IPython in three places:

* ``display_formatter.format`` is wrapped, so every display of a pandas
  ``DataFrame``/``Series``/``Styler``, a matplotlib ``Figure`` or a statsmodels
  results object (or its ``summary()``) — an ``execute_result``, ``display()``,
  ``plt.show()`` or the inline backend's end-of-cell flush alike — yields ONE
  bundle: the structured payload (:data:`~phds_tre.sdc.MIME_TYPE`) plus its
  ``text/plain`` and ``text/html`` companions, and nothing else (no
  ``image/png``). The same printers are registered with the
  ``mimebundle_formatter`` as a second line;
* ``post_run_cell``: every pyplot figure still open after a cell (a
  non-inline backend, ``plt.ioff()``) is displayed through the same path, and
  every captured figure is closed, so no backend shows its raw pixels later;
* import hooks: ``Axes.hist`` is wrapped when matplotlib loads (histogram bars
  carry their bins' row counts, :mod:`phds_tre.kernel.figures`) and
  statsmodels' ``Summary`` remembers the results it was made from, so a
  displayed summary is checked as a model.

Displays of matplotlib artists themselves (``plt.bar(...)`` as the last line
of a cell, the ``(counts, edges, patches)`` tuple of ``plt.hist``) show a short
note instead of their repr: the counts inside would otherwise leave as free
text, and the figure they belong to is captured anyway.

The kernel is untrusted (DESIGN.md, principle 3). Researcher code runs beside
these hooks and can undo them (``display(..., raw=True)``, ``print(df)``,
saving a PNG and displaying its bytes): whatever escapes is unstructured and
the checker treats it so — raw images and tables go to review or fail, and
the node's data-aware scanning looks for row-level values in them. Every
structured output is re-checked from its payload; nothing the kernel claims
is trusted.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.abc
import importlib.machinery
import sys
from collections.abc import Callable
from types import ModuleType
from typing import Any

__all__ = ["NOTE_MIME", "Capture", "ImportWatcher", "artist_note"]

#: A note shown instead of something that is neither captured nor safe to show as is.
NOTE_MIME = "text/plain"
_ARTIST_NOTE = "matplotlib objects: the figure they belong to is captured and checked when shown"


class _PatchingLoader(importlib.abc.Loader):
    """Runs the real loader, then the callbacks waiting for that module."""

    def __init__(self, loader: Any, callbacks: list[Callable[[ModuleType], None]]) -> None:
        self._loader = loader
        self._callbacks = callbacks

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loader, name)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        """Delegate to the real loader."""
        module: ModuleType | None = self._loader.create_module(spec)
        return module

    def exec_module(self, module: ModuleType) -> None:
        """Execute the module, then patch it."""
        self._loader.exec_module(module)
        for callback in self._callbacks:
            with contextlib.suppress(Exception):  # a failed patch must not break the import
                callback(module)


class ImportWatcher(importlib.abc.MetaPathFinder):
    """Call back when a module is imported (at once if it already is): patch lazily, import nothing."""

    def __init__(self) -> None:
        self._waiting: dict[str, list[Callable[[ModuleType], None]]] = {}

    def when_imported(self, name: str, callback: Callable[[ModuleType], None]) -> None:
        """Run ``callback(module)`` once ``name`` is imported."""
        module = sys.modules.get(name)
        if module is not None:
            callback(module)
        else:
            self._waiting.setdefault(name, []).append(callback)

    def find_spec(
        self, fullname: str, path: Any = None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        """Find the module with the other finders and wrap its loader when someone waits for it."""
        if fullname not in self._waiting:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        spec.loader = _PatchingLoader(spec.loader, self._waiting.pop(fullname))
        return spec


def _is_artist(obj: object, depth: int = 0) -> bool:
    """A matplotlib artist or container, or a list/tuple of them (with numpy arrays)."""
    if "matplotlib.artist" not in sys.modules:
        return False
    from matplotlib.artist import Artist
    from matplotlib.container import Container

    if isinstance(obj, (Artist, Container)):
        return True
    if depth < 3 and isinstance(obj, (list, tuple)) and 0 < len(obj) <= 10_000:
        import numpy as np

        found = [_is_artist(x, depth + 1) for x in obj]
        arrays = [isinstance(x, np.ndarray) for x in obj]
        return any(found) and all(f or a for f, a in zip(found, arrays, strict=True))
    return False


def artist_note() -> dict[str, str]:
    """The bundle shown instead of a matplotlib artist's repr."""
    return {NOTE_MIME: _ARTIST_NOTE}


def _failed(obj: object, exc: BaseException) -> dict[str, str]:
    return {
        NOTE_MIME: f"phds: this {type(obj).__name__} could not be captured as a checked output "
        f"({type(exc).__name__}); it is not shown"
    }


class Capture:
    """The capture hooks of one IPython shell (see the module docstring)."""

    def __init__(self, shell: Any) -> None:
        self.shell = shell
        self.watcher = ImportWatcher()
        self._original_format: Callable[..., Any] | None = None
        self._restore: list[Callable[[], None]] = []
        self.installed = False

    # ---- what is captured ----------------------------------------------------
    def bundle(self, obj: object) -> dict[str, Any] | None:
        """The display bundle of ``obj`` if the capture handles it, else None."""
        modules = sys.modules
        try:
            if "pandas" in modules:
                found = self._pandas(obj)
                if found is not None:
                    return found
            if "matplotlib.figure" in modules:
                from matplotlib.figure import Figure

                if isinstance(obj, Figure):
                    return self._figure(obj)
            if "statsmodels" in modules:
                found = self._statsmodels(obj)
                if found is not None:
                    return found
            if _is_artist(obj):
                return artist_note()
        except Exception as exc:  # never fall back to the raw display of captured types
            return _failed(obj, exc)
        return None

    def _pandas(self, obj: object) -> dict[str, Any] | None:
        import pandas as pd

        from phds_tre.sdc.frame import frame_output

        if isinstance(obj, (pd.DataFrame, pd.Series)):
            return frame_output(obj)._repr_mimebundle_()
        style = sys.modules.get("pandas.io.formats.style")
        if style is not None and isinstance(obj, style.Styler):
            # The styled table's full data: hidden rows and columns are checked too.
            return frame_output(obj.data, call="Styler")._repr_mimebundle_()
        return None

    def _figure(self, fig: Any) -> dict[str, Any]:
        from phds_tre.kernel.figures import figure_output

        try:
            return figure_output(fig)._repr_mimebundle_()
        finally:
            # Closed, so no backend (inline flush, a later plt.show) shows its raw pixels.
            pyplot = sys.modules.get("matplotlib.pyplot")
            if pyplot is not None:
                pyplot.close(fig)

    def _statsmodels(self, obj: object) -> dict[str, Any] | None:
        result = None
        summary_types = tuple(
            sys.modules[m].Summary
            for m in ("statsmodels.iolib.summary", "statsmodels.iolib.summary2")
            if m in sys.modules
        )
        if summary_types and isinstance(obj, summary_types):
            result = getattr(obj, "_phds_result", None)
            if result is None:
                return _summary_frame(obj)
        else:
            base = sys.modules.get("statsmodels.base.model")
            wrapper = sys.modules.get("statsmodels.base.wrapper")
            types = tuple(
                t
                for t in (
                    getattr(base, "Results", None),
                    getattr(wrapper, "ResultsWrapper", None),
                )
                if t is not None
            )
            if types and isinstance(obj, types):
                result = obj
        if result is None or not hasattr(result, "params") or not hasattr(result, "model"):
            return None
        from phds_tre.sdc.models import model_output_from_result

        try:
            return model_output_from_result(result)._repr_mimebundle_()
        except Exception:  # a model that cannot be rebuilt exactly: its table, review at best
            return _params_frame(result)

    # ---- hooks ---------------------------------------------------------------------
    def format(
        self, obj: object, include: Any = None, exclude: Any = None
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """``DisplayFormatter.format``: the captured bundle, else IPython's own formatting."""
        found = self.bundle(obj)
        if found is not None:
            return found, {}
        assert self._original_format is not None
        result: tuple[dict[str, Any], dict[str, Any]] = self._original_format(
            obj, include=include, exclude=exclude
        )
        return result

    def post_run_cell(self, result: Any = None) -> None:
        """Display (and so capture and close) every pyplot figure still open after a cell."""
        pyplot = sys.modules.get("matplotlib.pyplot")
        if pyplot is None:
            return
        from IPython.display import display
        from matplotlib._pylab_helpers import Gcf

        for manager in Gcf.get_all_fig_managers():
            fig = manager.canvas.figure
            if fig.axes:
                display(fig)
            pyplot.close(fig)

    def install(self) -> None:
        """Install every hook (idempotent)."""
        if self.installed:
            return
        formatter = self.shell.display_formatter
        own = "format" in vars(formatter)  # an instance attribute someone set before us
        self._original_format = formatter.format
        formatter.format = self.format
        if own:
            self._restore.append(lambda: setattr(formatter, "format", self._original_format))
        else:
            self._restore.append(lambda: vars(formatter).pop("format", None))
        bundles = formatter.mimebundle_formatter
        for module, name in (
            ("pandas.core.frame", "DataFrame"),
            ("pandas.core.series", "Series"),
            ("pandas.io.formats.style", "Styler"),
            ("matplotlib.figure", "Figure"),
        ):
            bundles.for_type_by_name(module, name, self._mimebundle_printer)
            self._restore.append(functools.partial(bundles.pop, f"{module}.{name}", None))
        self.shell.events.register("post_run_cell", self.post_run_cell)
        self._restore.append(
            lambda: self.shell.events.unregister("post_run_cell", self.post_run_cell)
        )
        sys.meta_path.insert(0, self.watcher)
        self._restore.append(lambda: sys.meta_path.remove(self.watcher))
        self.watcher.when_imported("matplotlib.axes._axes", self._patch_hist)
        self.watcher.when_imported("statsmodels.iolib.summary", self._patch_summary)
        self.watcher.when_imported("statsmodels.iolib.summary2", self._patch_summary2)
        self.installed = True

    def uninstall(self) -> None:
        """Undo :meth:`install` (patches of classes included)."""
        while self._restore:
            with contextlib.suppress(Exception):
                self._restore.pop()()
        self.installed = False

    def _mimebundle_printer(self, obj: object) -> dict[str, Any] | None:
        return self.bundle(obj)

    def _patch_hist(self, module: ModuleType) -> None:
        from phds_tre.kernel.figures import patch_hist, unpatch_hist

        axes_class = module.Axes
        original = patch_hist(axes_class)
        if original is not None:
            self._restore.append(lambda: unpatch_hist(axes_class, original))

    def _patch_summary(self, module: ModuleType) -> None:
        self._remember_results(module.Summary, "add_table_params", "res")

    def _patch_summary2(self, module: ModuleType) -> None:
        self._remember_results(module.Summary, "add_base", "results")

    def _remember_results(self, cls: type, method: str, argument: str) -> None:
        """Wrap ``cls.method`` so the summary keeps a reference to the results it describes."""
        original = getattr(cls, method)
        if getattr(original, "_phds_wrapped", False):
            return

        def remember(summary: Any, *args: Any, **kwargs: Any) -> Any:
            """Keep the results on the summary, then build it as statsmodels does."""
            results = args[0] if args else kwargs.get(argument)
            if results is not None and getattr(summary, "_phds_result", None) is None:
                summary._phds_result = results
            return original(summary, *args, **kwargs)

        remember._phds_wrapped = True  # type: ignore[attr-defined]
        setattr(cls, method, remember)
        self._restore.append(lambda: setattr(cls, method, original))


def _params_frame(result: Any) -> dict[str, Any]:
    """The parameter table of a fit that cannot be checked as a model: a raw ``"frame"``."""
    import numpy as np
    import pandas as pd

    from phds_tre.sdc.frame import frame_output

    names = [str(n) for n in getattr(result.model, "exog_names", None) or []]
    params = np.asarray(result.params, dtype=np.float64).ravel()
    if len(names) != len(params):
        names = [f"param_{i}" for i in range(len(params))]
    columns: dict[str, Any] = {"coef": params}
    for column, attr in (("std_err", "bse"), ("statistic", "tvalues"), ("p_value", "pvalues")):
        with contextlib.suppress(Exception):
            values = np.asarray(getattr(result, attr), dtype=np.float64).ravel()
            if values.shape == params.shape:
                columns[column] = values
    frame = pd.DataFrame(columns, index=pd.Index(names, name="parameter"))
    call = f"statsmodels.{type(result.model).__name__}"
    return frame_output(frame, call=call)._repr_mimebundle_()


def _summary_frame(summary: Any) -> dict[str, Any]:
    """The parameter table of a summary whose results are unknown: a raw ``"frame"``."""
    import pandas as pd

    from phds_tre.sdc.frame import frame_output

    table = summary.tables[1]
    if isinstance(table, pd.DataFrame):  # Summary2
        frame = table.apply(pd.to_numeric, errors="coerce")
    else:  # SimpleTable: header row, then one row per parameter
        rows = [[str(c).strip() for c in row] for row in table.data]
        frame = pd.DataFrame(
            [row[1:] for row in rows[1:]],
            index=pd.Index([row[0] for row in rows[1:]], name="parameter"),
            columns=rows[0][1:],
        ).apply(pd.to_numeric, errors="coerce")
    return frame_output(frame, call="statsmodels.summary")._repr_mimebundle_()

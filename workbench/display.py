"""Rich displays into a widget's output area, from a cell or from a widget's callback.

    show_in(output, table, figure)   # output (an ipywidgets.Output) now shows the table, then the figure
    styled(df, {"ms": "{:.2f}"})     # a DataFrame as a widget shows it: no index, columns formatted

``Output.append_display_data`` is not enough for a plotly figure: it asks IPython's display formatter, which lets
an object with ``_ipython_display_`` (every plotly figure) display itself wherever the kernel's output goes at that
moment (below the cell that is running; from a button's or a slider's callback, nowhere the page shows) and hands
the output area an empty bundle. Here a plotly figure is always its plotly JSON (``plotly_mimetype``, which
JupyterLab draws in the output area; its own ``_repr_mimebundle_`` follows ``plotly.io.renderers.default``, which
is empty outside a kernel and whatever another library set inside one), any other object's ``_repr_mimebundle_``
is asked next, then IPython's formatter (a DataFrame's table).

The output area's contents are set, not displayed into inside ``with output``: that kept headless kernels
(nbclient, the notebook tests) from going idle for minutes after a figure.
"""

from __future__ import annotations


def _bundle(obj) -> dict:
    from IPython.core.interactiveshell import InteractiveShell

    if type(obj).__module__.startswith("plotly.") and hasattr(obj, "to_dict"):
        import plotly.io as pio

        return {"output_type": "display_data", "data": pio.renderers["plotly_mimetype"].to_mimebundle(obj.to_dict()),
                "metadata": {}}
    if hasattr(obj, "_repr_mimebundle_"):
        bundle = obj._repr_mimebundle_()
        data, metadata = bundle if isinstance(bundle, tuple) else (bundle, {})
    else:
        data, metadata = InteractiveShell.instance().display_formatter.format(obj)
    return {"output_type": "display_data", "data": data, "metadata": metadata}


def show_in(output, *objects) -> None:
    """Set ``output``'s contents to ``objects``, each shown as a notebook cell would show it."""
    output.outputs = tuple(_bundle(obj) for obj in objects)


def styled(table, formats: dict):
    """``table`` (a DataFrame) as a widget shows it, the DataFrame itself keeping the numbers: no index, each
    column of ``formats`` through its format string or function. The plain table where pandas' Styler cannot
    load (it needs jinja2)."""
    try:
        return table.style.hide(axis="index").format(formats)
    except ImportError:
        return table

"""Every notebook in JupyterLab in a real browser: Run All on the tiny preset, then what the page shows.

One JupyterLab server (127.0.0.1, a token, ``window.jupyterapp`` exposed by ``--LabApp.expose_app_in_browser``)
and one headless Chromium page (the system's ``chromium``, driven by playwright) serve the notebooks in turn. Each
is copied with the tiny preset (as tests/test_notebooks.py does), opened, and run with the command behind the menu's
Run > Run All Cells. Then, on the page:

- every code cell ran (an execution count) and no output is an error, nor a widget's red ``error:`` line;
- every widget rendered: its output holds the widget, not "Loading widget...", "Error displaying widget" or
  the text repr that shows where the widget manager is missing;
- every plotly figure is drawn (an SVG with its traces), in cells and in widgets' output areas;
- one interaction per widget notebook changes the page as the notebook's text says it does (``INTERACTIONS``);
- the console logged no error and no exception escaped.

Each notebook runs once per suite: these tests skip where Chromium or playwright is missing, and only there does
tests/test_notebooks.py run the notebooks with nbclient. Every wait is bounded; a failure saves a screenshot
under the test's tmp_path and names it.

    WORKBENCH_SCREENSHOTS=DIR python3 -m pytest tests/test_browser.py   # also saves DIR/<notebook>.png after Run All
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from conftest import NOTEBOOKS, browser_missing, tiny_notebook

MISSING = browser_missing()
needs_browser = pytest.mark.skipif(MISSING is not None, reason=f"{MISSING}; tests/test_notebooks.py runs the notebooks")

START_TIMEOUT_S = 60  # the server answering, then JupyterLab started in the page (about 5 s on 2 idle cores)
RUN_ALL_TIMEOUT_S = 300  # Run All of one notebook (about 10 s each; nbclient's bound is 300 s a cell)
SETTLE_TIMEOUT_S = 30  # after Run All: figures drawn, widgets rendered; after a click: the kernel's answer shown
VIEWPORT = {"width": 1280, "height": 800}

# JupyterLab's user settings for the test (a fresh directory): no news or update checks, which ask in a toast and
# reach for the network.
SETTINGS = {"@jupyterlab/apputils-extension/notification.jupyterlab-settings":
            {"fetchNews": "false", "checkForUpdates": False}}


# ---- what runs in the page ----------------------------------------------------------------------------------------
# The notebook under test is the shell's current widget (opened by docmanager:open, which activates it).

OPEN_JS = """async (path) => {
    const app = window.jupyterapp;
    const panel = await app.commands.execute('docmanager:open', {path, factory: 'Notebook'});
    Array.from(app.shell.widgets('main')).filter(w => w !== panel).forEach(w => w.close());  // the launcher
    app.shell.activateById(panel.id);
    await panel.context.ready;
    await panel.sessionContext.ready;
}"""

# What the menu's Run > Run All Cells runs; it settles once every cell ran (true) or one failed (false).
RUN_ALL_JS = "() => window.jupyterapp.commands.execute('notebook:run-all-cells')"

KERNEL_IDLE_JS = """() => {
    const kernel = window.jupyterapp.shell.currentWidget.sessionContext.session?.kernel;
    return kernel?.status === 'idle';
}"""

# The kernel's shutdown is not awaited: it takes about 3 s, which the next notebook's start overlaps.
CLOSE_JS = """async () => {
    const panel = window.jupyterapp.shell.currentWidget;
    if (!panel || !panel.sessionContext) return;
    const shutdown = panel.sessionContext.shutdown();
    panel.context.model.dirty = false;  // no "save your changes?" dialog: the copy is thrown away
    panel.dispose();
    shutdown.catch(e => console.error('shutting the kernel down: ' + e));
}"""

# A plotly figure is drawn once its SVG is in place with its traces, at a size.
DRAWN_JS = """plot => !!plot && !!plot.querySelector('svg.main-svg') && (plot._fullData || []).length > 0
    && plot.getBoundingClientRect().width > 0 && plot.getBoundingClientRect().height > 0"""

# Everything the assertions need, in one pass over the notebook: per code cell its execution count and, per
# output, the model's output type and MIME types beside what the DOM holds for it (an output area has one child
# per output of its model, in order). Figures and widgets' error lines are counted across the whole panel, which
# reaches the output areas inside widgets.
PAGE_JS = """() => {
    const panel = window.jupyterapp.shell.currentWidget, drawn = %s;
    const cells = [];
    panel.content.widgets.forEach((cell, index) => {
        if (cell.model.type !== 'code') return;
        const json = cell.model.toJSON();
        const children = cell.outputArea.node.querySelectorAll(':scope > .jp-OutputArea-child');
        cells.push({index, count: json.execution_count, outputs: json.outputs.map((o, k) => {
            const node = children[k];
            return {mimes: Object.keys(o.data || {}),
                    error: o.output_type === 'error' ? `${o.ename}: ${o.evalue}` : null,
                    widget: !!node?.querySelector('.jupyter-widgets:not(.jupyter-widgets-disconnected)'),
                    drawn: drawn(node?.querySelector('.js-plotly-plot')),
                    text: node ? node.textContent.slice(0, 200) : null};
        })});
    });
    const plots = Array.from(panel.node.querySelectorAll('.js-plotly-plot'));
    return {
        cells,
        plots: plots.length,
        undrawn: plots.filter(p => !drawn(p)).length,
        text: panel.node.textContent,
        widgetErrors: Array.from(panel.node.querySelectorAll('.widget-html')).map(e => e.textContent.trim())
            .filter(t => t.startsWith('error:')),
    };
}""" % DRAWN_JS

# True once the page has settled after Run All: every figure drawn, no widget still loading.
SETTLED_JS = """() => {
    const panel = window.jupyterapp.shell.currentWidget, drawn = %s;
    return !panel.node.textContent.includes('Loading widget')
        && Array.from(panel.node.querySelectorAll('.js-plotly-plot')).every(drawn);
}""" % DRAWN_JS

WIDGET_MIME = "application/vnd.jupyter.widget-view+json"
PLOTLY_MIME = "application/vnd.plotly.v1+json"
WIDGET_FAILURES = ("Loading widget", "Error displaying widget")


# ---- the server and the page ----------------------------------------------------------------------------------------

def _settle(page, fn: str, arg=None, *, timeout_s: float, what: str) -> str:
    """Calls the async JavaScript function ``fn`` with ``arg`` in the page and waits at most ``timeout_s`` for it to
    settle; returns its value as a string. Polled from here, not awaited in one ``evaluate``: that has no bound, and
    a promise awaited that way while JupyterLab started was once dropped ("Resulting promise was garbage
    collected")."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    page.evaluate(f"""(arg) => {{
        window.__workbenchSettled = undefined;
        Promise.resolve(({fn})(arg)).then(value => {{ window.__workbenchSettled = {{value: String(value)}}; }},
                                          error => {{ window.__workbenchSettled = {{error: String(error)}}; }});
    }}""", arg)
    try:
        page.wait_for_function("window.__workbenchSettled !== undefined", polling=250, timeout=timeout_s * 1000)
    except PlaywrightTimeout:
        raise AssertionError(f"{what}: not within {timeout_s} s") from None
    result = page.evaluate("window.__workbenchSettled")
    assert "error" not in result, f"{what}: {result['error']}"
    return result["value"]


@dataclass
class Lab:
    """A JupyterLab page serving ``root``."""
    root: Path
    page: object  # playwright.sync_api.Page
    console_errors: list[str] = field(default_factory=list)  # console errors and uncaught exceptions, not yet taken

    def take_console_errors(self) -> list[str]:
        errors = list(self.console_errors)
        self.console_errors.clear()
        return errors


def _start_server(root: Path, log) -> tuple[subprocess.Popen, str]:
    """``jupyter lab`` serving ``root`` on 127.0.0.1 (a free port), with JupyterLab's state in ``root/.jupyter``;
    returns the process and its URL with the token, once it answers."""
    state = root / ".jupyter"
    for name, value in SETTINGS.items():
        path = state / "settings" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(value))
    token = os.urandom(16).hex()
    env = {**os.environ, "JUPYTER_CONFIG_DIR": str(state / "config"), "JUPYTER_RUNTIME_DIR": str(state / "runtime"),
           "JUPYTERLAB_SETTINGS_DIR": str(state / "settings"), "JUPYTERLAB_WORKSPACES_DIR": str(state / "workspaces")}
    server = subprocess.Popen(
        [sys.executable, "-m", "jupyter", "lab", "--no-browser", "--allow-root", "--ServerApp.ip=127.0.0.1",
         "--ServerApp.port=0", f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}",
         "--ServerApp.terminals_enabled=False", "--LabApp.expose_app_in_browser=True"],
        cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline and server.poll() is None:
        # the server writes its URL, with the port it was given, to the runtime directory
        info = [json.loads(p.read_text()) for p in (state / "runtime").glob(f"jpserver-{server.pid}.json")]
        if info:
            url = info[0]["url"]
            try:
                urllib.request.urlopen(f"{url}api/status?token={token}", timeout=2).read()
                return server, f"{url}lab?token={token}"
            except OSError:
                pass
        time.sleep(0.2)
    return server, ""


def _stop(server: subprocess.Popen) -> None:
    """SIGTERM (the server shuts its kernels down), SIGKILL if it does not exit in 15 s."""
    if server.poll() is None:
        server.terminate()
        try:
            server.wait(15)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(5)


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """JupyterLab serving a temporary directory and a Chromium page on it, for the module; both stopped at its end
    (the server with SIGTERM, which shuts its kernels down), also when a test failed."""
    from playwright.sync_api import sync_playwright

    root = tmp_path_factory.mktemp("lab")
    with open(root / "jupyter.log", "w") as log:
        server, url = _start_server(root, log)
        try:
            assert url, f"JupyterLab did not answer within {START_TIMEOUT_S} s; its log: {root / 'jupyter.log'}"
            with sync_playwright() as pw:
                browser = pw.chromium.launch(executable_path=shutil.which("chromium"), headless=True)
                try:
                    page = browser.new_page(viewport=VIEWPORT)
                    lab = Lab(root, page)

                    def console(message):
                        # errors only: plotly.js logs warnings through console.trace ("Invalid color specifier:
                        # Float64Array(20)" for the bar colours of 01's op histogram, drawn right all the same)
                        if message.type == "error":
                            where = f"{message.location.get('url', '')}:{message.location.get('lineNumber', '')}"
                            lab.console_errors.append(f"console: {message.text} ({where})")

                    page.on("console", console)
                    page.on("pageerror", lambda error: lab.console_errors.append(f"uncaught: {error}"))
                    page.goto(url, timeout=START_TIMEOUT_S * 1000)
                    page.wait_for_function("!!window.jupyterapp", polling=200, timeout=START_TIMEOUT_S * 1000)
                    # the notebooks get the whole width: the file browser collapsed
                    _settle(page, "async () => { await jupyterapp.restored; jupyterapp.shell.collapseLeft(); }",
                            timeout_s=START_TIMEOUT_S, what="JupyterLab restoring its layout")
                    yield lab
                finally:
                    browser.close()
        finally:
            _stop(server)


# ---- interactions: one per widget notebook -------------------------------------------------------------------------
# Each takes the page, the notebook's widget and the notebook's directory, does what a reader would, and asserts
# what the notebook's text says follows. Texts are read with textContent: JupyterLab skips rendering cells out of
# view (content-visibility), which empties innerText.

NOTEBOOK = ".jp-NotebookPanel:not(.lm-mod-hidden)"  # the notebook shown


def _widget(page, title: str):
    """The rendered widget whose title line is ``title``, scrolled into view."""
    widget = page.locator(f"{NOTEBOOK} .jp-OutputArea-output > .jupyter-widgets", has_text=title).first
    widget.scroll_into_view_if_needed()
    return widget


def _text(locator) -> str:
    return (locator.text_content() or "").strip()


def _wait_for(page, js: str, arg, what: str) -> None:
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    try:
        page.wait_for_function(js, arg=arg, polling=200, timeout=SETTLE_TIMEOUT_S * 1000)
    except PlaywrightTimeout:
        raise AssertionError(f"{what}: not within {SETTLE_TIMEOUT_S} s") from None


def _new_status(page, status, before: str, what: str) -> str:
    """The widget's status line once it shows something other than ``before`` and is not a "...ing..." line."""
    _wait_for(page, """([el, before]) => { const t = el.textContent.trim();
                          return t !== before && !t.endsWith('...'); }""", [status.element_handle(), before], what)
    return _text(status)


def _figures(output) -> list[dict]:
    """Title, trace types and annotations of each plotly figure drawn in ``output``."""
    return output.evaluate("""el => Array.from(el.querySelectorAll('.js-plotly-plot'))
        .filter(p => p.querySelector('svg.main-svg') && (p._fullData || []).length > 0)
        .map(p => ({title: p._fullLayout.title?.text || '', types: p._fullData.map(t => t.type),
                    annotations: (p._fullLayout.annotations || []).map(a => a.text)}))""")


def _untick_and_run(page, widget, directory: Path) -> None:
    """02: "Tick or untick passes above and press Run passes ... Its results appear in the widget above, under the
    button: the report table, then the two figures." Without fuse_silu_mul: more nodes, no row for it."""
    button = page.get_by_role("button", name="Run passes")  # as a filter: matched inside the element filtered
    run, status = widget.locator(button), widget.locator(".widget-hbox").filter(has=button).locator(".widget-html")
    output = widget.locator(".widget-output")
    before = _text(status)
    nodes_before = int(re.search(r"→ (\d+) nodes", before).group(1))
    widget.locator(".widget-checkbox", has_text="fuse_silu_mul").locator("input").uncheck()
    run.click()
    after = _new_status(page, status, before, "02: the status line after Run passes")
    nodes = re.search(r"→ (\d+) nodes", after)
    assert nodes and int(nodes.group(1)) > nodes_before, f"02: without fuse_silu_mul: {after!r} (before: {before!r})"
    _wait_for(page, "el => el.querySelectorAll('.js-plotly-plot .main-svg').length >= 2", output.element_handle(),
              "02: two figures under the report table, in the widget")
    table = _text(output.locator("table").first)
    assert "fuse_rms_norm" in table and "fuse_silu_mul" not in table, f"02: the report table: {table[:300]!r}"
    assert len(_figures(output)) == 2, f"02: figures in the widget: {_figures(output)}"


def _pick_view(page, widget, directory: Path) -> None:
    """03: "The widget's view dropdown picks the figure drawn under it." Run All leaves it on the roofline;
    op share draws the share of tuned time per op type in its place."""
    output = widget.locator(".widget-output")
    widget.locator(".widget-dropdown", has_text="view").locator("select").select_option("op share")
    _wait_for(page, """el => Array.from(el.querySelectorAll('.js-plotly-plot'))
                         .some(p => (p._fullLayout?.title?.text || '').includes('Share of tuned time'))""",
              output.element_handle(), "03: the op share figure under the view dropdown")
    assert len(_figures(output)) == 1, f"03: figures in the widget: {_figures(output)}"


COLOURS = {"green": "rgb(200, 230, 201)", "amber": "rgb(255, 224, 163)", "red": "rgb(244, 182, 182)",
           "grey": "rgb(228, 228, 228)"}  # workbench.quant.widgets.COLOURS as the browser computes them


def _edit_and_save(page, widget, directory: Path) -> None:
    """04: "Pick a format per group (the colour is that group's sensitivity in the format shown) ... Save to write
    it to the workspace." Layer 0's first group changed by hand: its colour follows its tooltip's number (green up
    to +0.5 %, amber up to +2 %, red beyond: the widget's thresholds), and Save writes the edit."""
    select = widget.locator(".widget-dropdown select").first  # layer 0's first group
    status = widget.locator(".widget-html").last  # the widget's last line
    new = "int8_wo" if select.input_value() != "int8_wo" else "fp8"
    before = _text(status)
    select.select_option(new)
    edited = _new_status(page, status, before, "04: the status line after a hand edit")
    group = edited.split(" → ")[0]
    assert edited == f"{group} → {new} (edited: the auto plan keeps it)", f"04: after choosing {new}: {edited!r}"
    _wait_for(page, "([el, head]) => el.title.startsWith(head)", [select.element_handle(), f"{group}: {new}"],
              f"04: the tooltip of {group} in {new}")
    title = select.get_attribute("title")
    number = re.search(r"ppl_delta_pct ([-+]\S+)", title)
    level = ("grey" if number is None else "green" if float(number.group(1)) <= 0.5 else
             "amber" if float(number.group(1)) <= 2.0 else "red")
    background = select.evaluate("el => getComputedStyle(el).backgroundColor")
    assert background == COLOURS[level], f"04: {title!r} is {level}, the dropdown is {background}"
    widget.get_by_role("button", name="Save").click()
    saved = _new_status(page, status, edited, "04: the status line after Save")
    plan_path = directory / "ws" / "precision_plan.json"
    assert saved == f"saved to {plan_path}", f"04: after Save: {saved!r}"
    plan = json.loads(plan_path.read_text())
    assert plan["groups"][group]["format"] == new and group in plan["edited"], f"04: the saved plan: {plan}"


def _move_slider(page, widget, directory: Path) -> None:
    """05: "Change the fields above; the plan and the figure follow." The memory fraction dragged from 0.5 to
    about 0.25: fewer blocks in the plan, the figure's line at the new fraction."""
    status, output = widget.locator(".widget-html").last, widget.locator(".widget-output")  # the plan, the figure
    before = _text(status)
    slider = widget.locator(".widget-slider", has_text="memory fraction")
    handle, track = slider.locator(".noUi-handle").bounding_box(), slider.locator(".noUi-target").bounding_box()
    y = handle["y"] + handle["height"] / 2
    page.mouse.move(handle["x"] + handle["width"] / 2, y)
    page.mouse.down()
    page.mouse.move(track["x"] + track["width"] * 0.2, y, steps=5)
    page.mouse.up()
    fraction = float(_text(slider.locator(".widget-readout")))
    assert fraction < 0.5, f"05: the slider reads {fraction} after the drag"
    after = _new_status(page, status, before, "05: the plan after the slider moved")
    blocks = [int(re.search(r"(\d+) blocks", s).group(1)) for s in (before, after)]
    assert blocks[1] < blocks[0], f"05: at fraction {fraction}: {after!r}; at 0.5: {before!r}"
    _wait_for(page, """([el, label]) => Array.from(el.querySelectorAll('.js-plotly-plot')).some(p =>
                         (p._fullLayout?.annotations || []).some(a => a.text === label))""",
              [output.element_handle(), f"fraction {fraction:g}"], f"05: the figure's line at fraction {fraction:g}")
    assert len(_figures(output)) == 1, f"05: figures in the widget: {_figures(output)}"


def _diff_pair(page, widget, directory: Path) -> None:
    """06: "Pick a pair of stages, type a prompt ... and press Diff: the first-divergence line, the per-layer table
    and the figure are redrawn under the button." Run All leaves it on quant vs transformers; quant vs passes on
    six token ids names the passes stage in the line, the table and figure follow."""
    status, output = widget.locator(".widget-html").last, widget.locator(".widget-output")
    before = _text(status)
    widget.locator(".widget-dropdown", has_text="compare").locator("select").select_option("quant vs passes")
    widget.locator(".widget-text", has_text="prompt").locator("input").fill("5, 6, 7, 8, 9, 10")
    widget.get_by_role("button", name="Diff").click()
    after = _new_status(page, status, before, "06: the status line after Diff")
    assert after.startswith(("no divergence: ", "first divergence: ")) and "(passes)" in after, \
        f"06: after Diff on quant vs passes: {after!r} (before: {before!r})"
    _wait_for(page, """el => Array.from(el.querySelectorAll('.js-plotly-plot'))
                         .some(p => (p._fullData || []).some(t => t.name === 'quant vs passes'))""",
              output.element_handle(), "06: the figure of quant vs passes under the button")
    assert "rel_err" in _text(output.locator("table").first), "06: the per-layer table under the button"
    assert len(_figures(output)) == 1, f"06: figures in the widget: {_figures(output)}"


#: notebook -> (the title line of its widget, the interaction)
INTERACTIONS = {"02_graph_passes.ipynb": ("Graph passes", _untick_and_run),
                "03_autotune.ipynb": ("Optimization profile", _pick_view),
                "04_quantize.ipynb": ("Precision plan", _edit_and_save),
                "05_runtime.ipynb": ("KV-cache capacity", _move_slider),
                "06_debug.ipynb": ("First divergence", _diff_pair)}


# ---- the test -------------------------------------------------------------------------------------------------------

def _problems(page_state: dict) -> list[str]:
    """What the page shows wrong after Run All, one line each."""
    problems = []
    for cell in page_state["cells"]:
        where = f"cell {cell['index']}"
        if cell["count"] is None:
            problems.append(f"{where} did not run")
        for k, out in enumerate(cell["outputs"]):
            if out["error"]:
                problems.append(f"{where} output {k}: error {out['error']}")
            if WIDGET_MIME in out["mimes"] and not out["widget"]:
                problems.append(f"{where} output {k}: a widget shown as {out['text']!r}")
            if PLOTLY_MIME in out["mimes"] and not out["drawn"]:
                problems.append(f"{where} output {k}: a plotly figure not drawn ({out['text']!r})")
    if page_state["undrawn"]:
        problems.append(f"{page_state['undrawn']} of {page_state['plots']} plotly figures not drawn")
    problems += [f"the page shows {t!r}" for t in WIDGET_FAILURES if t in page_state["text"]]
    problems += [f"a widget shows {t!r}" for t in page_state["widgetErrors"]]
    return problems


@needs_browser
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_in_browser(path, lab, tmp_path):
    from playwright.sync_api import Error as PlaywrightError, TimeoutError as PlaywrightTimeout

    directory = lab.root / path.stem
    tiny_notebook(path, directory)
    page, failed = lab.page, True
    try:
        _settle(page, OPEN_JS, f"{path.stem}/{path.name}", timeout_s=START_TIMEOUT_S, what="opening the notebook")
        started = time.monotonic()
        ran = _settle(page, RUN_ALL_JS, timeout_s=RUN_ALL_TIMEOUT_S, what="Run All")
        try:
            page.wait_for_function(KERNEL_IDLE_JS, polling=250, timeout=SETTLE_TIMEOUT_S * 1000)
        except PlaywrightTimeout:
            raise AssertionError(f"the kernel still busy {SETTLE_TIMEOUT_S} s after Run All") from None
        print(f"{path.name}: Run All {time.monotonic() - started:.1f} s")
        try:
            page.wait_for_function(SETTLED_JS, polling=250, timeout=SETTLE_TIMEOUT_S * 1000)
        except PlaywrightTimeout:
            pass  # what is still missing is named below
        problems = _problems(page.evaluate(PAGE_JS))
        if ran != "true" or problems:
            state = "finished" if ran == "true" else "stopped"
            raise AssertionError(f"after Run All ({state}):\n" + "\n".join(problems))
        assert (directory / "ws" / "capture" / "record.json").is_file(), "the notebook left no captured workspace"
        title, interact = INTERACTIONS.get(path.name, (None, None))
        if os.environ.get("WORKBENCH_SCREENSHOTS"):
            _screenshot(page, title, Path(os.environ["WORKBENCH_SCREENSHOTS"]) / f"{path.stem}.png")
        if interact:
            interact(page, _widget(page, title), directory)
            page.wait_for_function(KERNEL_IDLE_JS, polling=250, timeout=SETTLE_TIMEOUT_S * 1000)
        errors = lab.take_console_errors()
        assert not errors, "the console:\n" + "\n".join(errors)
        failed = False
    except (AssertionError, PlaywrightError) as e:
        shot = tmp_path / f"{path.stem}.png"
        page.screenshot(path=shot)
        lab.take_console_errors()  # this notebook's, not the next one's
        raise AssertionError(f"{path.name}: {e}\nscreenshot: {shot}") from e
    finally:
        try:
            _settle(page, CLOSE_JS, timeout_s=SETTLE_TIMEOUT_S, what="closing the notebook")
        except (AssertionError, PlaywrightError):
            if not failed:  # else the test's own failure is the one to see
                raise


def _screenshot(page, title: str | None, path: Path) -> None:
    """The notebook's main view: the cell of its widget (``title``), else of its first figure, at the top."""
    path.parent.mkdir(parents=True, exist_ok=True)
    main = _widget(page, title) if title else page.locator(f"{NOTEBOOK} .js-plotly-plot").first
    main.evaluate("el => el.closest('.jp-Cell').scrollIntoView({block: 'start'})")
    page.wait_for_timeout(500)  # the scroll's repaint
    page.screenshot(path=path)


def test_every_widget_notebook_has_an_interaction():
    widget_notebooks = {p.name for p in NOTEBOOKS if "widgets import" in p.read_text()}
    assert widget_notebooks == set(INTERACTIONS)

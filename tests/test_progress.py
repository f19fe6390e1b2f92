"""The one progress bar: tqdm's when enabled (closed when its block ends, also by an error), silent otherwise."""

import pytest

from workbench.progress import SilentBar, progress_bar


def test_a_bar_counts_and_closes_even_on_an_error(capsys):
    with progress_bar(3, "work", "item") as bar:
        for _ in range(3):
            bar.update(1)
    assert bar.n == 3 and not isinstance(bar, SilentBar)
    assert "work: 100%" in capsys.readouterr().err
    with pytest.raises(KeyboardInterrupt):
        with progress_bar(5, "interrupted", "item") as bar:
            bar.update(2)
            raise KeyboardInterrupt
    assert bar.n == 2 and "interrupted:  40%" in capsys.readouterr().err  # closed: its last state was printed


def test_no_bar_when_disabled_or_nothing_to_do(capsys):
    for kw in ({"enabled": False}, {}):
        with progress_bar(0 if not kw else 4, "quiet", "item", **kw) as bar:
            bar.update(1)
            bar.set_postfix_str("x")
        assert isinstance(bar, SilentBar)
    assert capsys.readouterr().err == ""


def test_a_callable_gets_the_progress_instead_of_a_bar(capsys):
    from workbench.progress import progress_bar

    seen = []
    with progress_bar(3, "rounds", "round", enabled=lambda done, total, desc: seen.append((done, total, desc))) as bar:
        bar.update(1)
        bar.update(2)
    assert seen == [(0, 3, "rounds"), (1, 3, "rounds"), (3, 3, "rounds")]
    assert capsys.readouterr().err == ""  # no tqdm bar drawn

"""The progress shown while a phase runs: a bar on a terminal, plain lines off one."""

from __future__ import annotations

import io
import threading

from rich.console import Console

from qlora_cli.core.console import Steps


def test_steps_with_a_text_print_a_line_when_it_changes_and_count_from_every_thread():
    log = io.StringIO()
    with Steps(Console(file=log, force_terminal=False), "Merging", 2) as steps:
        steps.advance(1, "layer 1 of 2")
        steps.advance(0, "layer 1 of 2")  # the same text again: no second line
        steps.advance(1, "layer 2 of 2")
    assert log.getvalue().splitlines() == ["Merging: layer 1 of 2", "Merging: layer 2 of 2"]

    quiet = io.StringIO()
    with Steps(Console(file=quiet, force_terminal=False), "Judging", 800, plain_every=float("inf")) as steps:
        workers = [threading.Thread(target=lambda: [steps.advance() for _ in range(100)]) for _ in range(8)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
    assert steps.done == 800 and quiet.getvalue().splitlines() == ["Judging: 800/800 (100%), 0:00 elapsed"]


def test_steps_on_a_terminal_show_the_text_and_the_time_left():
    screen = io.StringIO()
    with Steps(Console(file=screen, force_terminal=True, width=120), "Merging", 2, transient=True) as steps:
        steps.advance(1, "layer 1 of 2")
    shown = screen.getvalue()
    assert "Merging: layer 1 of 2" in shown and "1/2" in shown and "eta" in shown


def test_steps_with_a_unit_show_the_rate():
    from qlora_cli.core.console import plain_line

    assert plain_line("Tokenizing", 30_000, 120_000, 10.0, unit="rows") == (
        "Tokenizing: 30,000/120,000 (25%), 0:10 elapsed, 3,000 rows/s, about 0:30 left")
    screen = io.StringIO()
    with Steps(Console(file=screen, force_terminal=True, width=120), "Tokenizing", 10, unit="rows") as steps:
        steps.advance(5)
    assert "rows/s" in screen.getvalue() and "5/10" in screen.getvalue()

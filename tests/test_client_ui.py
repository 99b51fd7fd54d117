"""chat.client.ui.Screen: every line reaches the terminal whole, in order, never mid-prompt.

The prompt's event loop is a real asyncio loop run here, without a terminal: with no
prompt_toolkit application running, `run_in_terminal` calls straight through, so these
tests check who writes when, not how prompt_toolkit redraws.
"""

from __future__ import annotations

import asyncio
import threading

import pytest

from chat.client.ui import Screen


def show_from_another_thread(screen: Screen, *texts: str) -> None:
    def show_all() -> None:
        for text in texts:
            screen.show(text)

    thread = threading.Thread(target=show_all)
    thread.start()
    thread.join()


def test_with_no_prompt_up_a_line_is_written_at_once_with_its_newline() -> None:
    written: list[str] = []
    screen = Screen(written.append)
    screen.show("-- ok: leave #dev")
    show_from_another_thread(screen, "two\nlines")
    assert written == ["-- ok: leave #dev\n", "two\nlines\n"]


async def _turns(written: list[str], want: int) -> None:
    # Give the loop's callbacks and tasks their turns (no clock involved).
    for _ in range(100):
        if len(written) >= want:
            return
        await asyncio.sleep(0)


@pytest.mark.parametrize("prompt_running", [True, False], ids=["above-it", "below-a-done-one"])
def test_while_a_prompt_is_up_only_its_loop_writes(prompt_running: bool) -> None:
    written: list[str] = []
    writers: list[threading.Thread] = []

    def write(text: str) -> None:
        written.append(text)
        writers.append(threading.current_thread())

    screen = Screen(write)

    async def prompt() -> None:
        screen.prompt_started(asyncio.get_running_loop(), lambda: prompt_running)
        show_from_another_thread(screen, "a", "b")
        assert written == []  # not from the printer's thread while the prompt is up
        await _turns(written, 1)

    asyncio.run(prompt())
    assert written == ["a\nb\n"]  # by the loop, before the prompt returned
    screen.prompt_ended()
    assert written == ["a\nb\n"]
    assert writers == [threading.main_thread()]


def test_what_the_loop_did_not_write_is_written_when_the_prompt_returns() -> None:
    written: list[str] = []
    screen = Screen(written.append)
    loop = asyncio.new_event_loop()  # never run: its callbacks never come
    screen.prompt_started(loop, lambda: True)
    screen.show("one")
    loop.close()
    screen.show("two")  # a closed loop refuses the callback; the line waits all the same
    assert written == []
    screen.prompt_ended()
    screen.show("three")
    assert written == ["one\ntwo\n", "three\n"]


def test_the_end_of_the_connection_reaches_only_a_prompt_that_is_up() -> None:
    calls: list[str] = []
    screen = Screen(lambda text: None)
    screen.call_in_prompt(lambda: calls.append("no prompt"))

    async def prompt() -> None:
        screen.prompt_started(asyncio.get_running_loop(), lambda: True)
        thread = threading.Thread(target=screen.call_in_prompt, args=(lambda: calls.append("up"),))
        thread.start()
        thread.join()
        for _ in range(100):
            if calls:
                break
            await asyncio.sleep(0)

    asyncio.run(prompt())
    screen.prompt_ended()
    assert calls == ["up"]


def test_lines_from_many_threads_keep_each_threads_order_across_prompts() -> None:
    written: list[str] = []
    screen = Screen(written.append)
    texts = {name: [f"{name}{n}" for n in range(200)] for name in "xyz"}

    async def prompt() -> None:
        screen.prompt_started(asyncio.get_running_loop(), lambda: True)
        await asyncio.sleep(0)

    threads = [threading.Thread(target=show_from_another_thread, args=(screen, *t))
               for t in texts.values()]
    for thread in threads:
        thread.start()
    for _ in range(5):  # prompts come and go while the lines arrive
        asyncio.run(prompt())
        screen.prompt_ended()
    for thread in threads:
        thread.join()
    screen.prompt_ended()
    lines = "".join(written).split("\n")
    assert lines[-1] == "" and all(chunk.endswith("\n") for chunk in written)
    for name, expected in texts.items():
        assert [line for line in lines if line.startswith(name)] == expected

"""llama_gen.serve.threads: work run on a passing thread (so that its OpenMP threads end with it)."""

import threading

import pytest

from llama_gen.serve.threads import on_passing_thread


def test_on_passing_thread_returns_raises_and_leaves_no_thread_behind():
    caller = threading.current_thread()
    ran_on = []

    def work(a, b=0):
        ran_on.append(threading.current_thread())
        return a + b

    before = threading.active_count()
    assert on_passing_thread(work, 2, b=3) == 5
    assert ran_on[0] is not caller and not ran_on[0].is_alive()
    with pytest.raises(ValueError, match="bad checkpoint"):
        on_passing_thread(lambda: (_ for _ in ()).throw(ValueError("bad checkpoint")))
    assert threading.active_count() == before

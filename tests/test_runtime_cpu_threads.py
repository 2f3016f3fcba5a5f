"""ThreadChooser: small CPU steps take the thread count their own timings show faster."""

import pytest
import torch

from trt_gemma.runtime.cpu_threads import ThreadChooser


def _probe(chooser: ThreadChooser, seconds: dict[int, float]) -> None:
    """Feed one full probe in which a step on n threads takes seconds[n]."""
    while chooser._probing:
        n = chooser.threads(1)
        chooser.record(1, n, seconds[n])


@pytest.mark.parametrize("faster", [1, 4])
def test_picks_the_faster_count_and_uses_all_threads_for_large_steps(faster):
    chooser = ThreadChooser(max_threads=4, small_below=16, probe_steps=3, reprobe_every=10)
    _probe(chooser, {1: 0.05 if faster == 1 else 0.09, 4: 0.09 if faster == 1 else 0.05})
    assert chooser.threads(1) == faster
    assert chooser.threads(15) == faster
    assert chooser.threads(16) == 4 and chooser.threads(2048) == 4


def test_probe_alternates_and_reprobes_after_the_interval():
    chooser = ThreadChooser(max_threads=2, small_below=8, probe_steps=2, reprobe_every=5)
    order = []
    while chooser._probing:
        n = chooser.threads(1)
        order.append(n)
        chooser.record(1, n, 0.01 * n)  # 1 thread faster
    assert sorted(order) == [1, 1, 2, 2] and order[0] != order[1]
    assert chooser.threads(1) == 1
    for _ in range(4):
        chooser.record(1, 1, 0.01)
        assert not chooser._probing
    chooser.record(1, 1, 0.01)  # the 5th small step since the probe: measure again
    assert chooser._probing
    _probe(chooser, {1: 0.09, 2: 0.02})  # the machine went quiet: 2 threads now faster
    assert chooser.threads(1) == 2


def test_large_steps_are_not_timed_and_step_restores_the_thread_count():
    chooser = ThreadChooser(max_threads=2, small_below=8, probe_steps=1)
    chooser.record(100, 2, 5.0)
    assert all(not s for s in chooser._samples.values())
    before = torch.get_num_threads()
    for _ in range(3):
        with chooser.step(1):
            pass
    assert torch.get_num_threads() == before
    assert not chooser._probing  # two timed small steps completed the 1-step probe


def test_one_thread_machine_never_probes():
    chooser = ThreadChooser(max_threads=1, small_below=16)
    assert chooser.threads(1) == 1 and chooser.threads(100) == 1


def test_invalid_arguments():
    with pytest.raises(ValueError, match="max_threads"):
        ThreadChooser(max_threads=0, small_below=16)

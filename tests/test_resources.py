"""zoo.resources: the CPU thread and data-loader worker decisions, as pure functions of the machine.

The figures they must reproduce were measured with the quickstart (docs/lightning.md#threads): on
an idle 2-core machine PyTorch's default of 2 threads is fastest; next to another 2-thread job one
thread is 2x faster than two.
"""

import pytest

from zoo import resources
from zoo.resources import plan_threads, plan_workers, threads_set_by_user


@pytest.mark.parametrize(
    "cores, load, processes, expected",
    [
        (2, 0.0, 1, 2),    # idle 2-core machine: torch's default, the fastest there
        (2, 0.3, 1, 2),    # our own start-up shows in the load average
        (2, 1.0, 1, 1),    # one other busy thread
        (2, 2.0, 1, 1),    # next to a 2-thread job: 1 thread, not 2 fighting for the cores
        (2, 7.5, 1, 1),    # never 0
        (16, 0.0, 1, 16),
        (16, 4.2, 1, 12),
        (16, 0.0, 4, 4),   # 4 DDP processes on one machine share it
        (16, 8.0, 4, 2),
        (3, 0.0, 4, 1),    # more processes than cores
    ],
)
def test_plan_threads(cores, load, processes, expected):
    assert plan_threads(cores, load, processes) == expected


@pytest.mark.parametrize(
    "cores, load, processes, on_cpu, expected",
    [
        (2, 0.0, 1, True, 0),     # CPU training: the main process reads far faster than the model trains
        (64, 0.0, 8, True, 0),
        (16, 0.0, 1, False, 4),   # GPU: workers, at most 4
        (16, 0.0, 4, False, 3),   # 4 cores per process, one for the process itself
        (8, 6.0, 1, False, 1),
        (2, 2.0, 1, False, 0),    # no free core: no worker
    ],
)
def test_plan_workers(cores, load, processes, on_cpu, expected):
    assert plan_workers(cores, load, processes, on_cpu) == expected


def test_plans_refuse_impossible_machines():
    with pytest.raises(ValueError, match="cores=0 and processes=1 must be >= 1"):
        plan_threads(0, 0.0)
    with pytest.raises(ValueError, match="processes=0"):
        plan_workers(2, 0.0, processes=0)


def test_an_explicit_thread_setting_is_the_users():
    assert threads_set_by_user({}) is None
    assert threads_set_by_user({"OMP_NUM_THREADS": "3"}) == "OMP_NUM_THREADS"
    assert threads_set_by_user({"MKL_NUM_THREADS": "1"}) == "MKL_NUM_THREADS"
    assert threads_set_by_user({"OMP_NUM_THREADS": " "}) is None


def test_machine_readings_are_sane():
    assert resources.usable_cores() >= 1
    assert resources.load_average() >= 0.0

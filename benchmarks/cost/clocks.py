"""Timing primitives and the load detector.

Every timed interval records two clocks and two load signals:

* ``wall``: ``time.perf_counter``; ``cpu``: ``time.process_time``, the process's CPU time (user + system, all
  threads). With one torch thread a step runs on one core, so ``cpu`` ~ ``wall`` when nothing else competes for
  it; the time the process spends descheduled while other jobs run counts in ``wall`` and not in ``cpu``.
* ``wait``: the seconds the measuring thread spent runnable but waiting for a core (Linux
  ``/proc/thread-self/schedstat``, second field); ``preempt``: involuntary context switches
  (``getrusage``). Both are 0 on a machine to ourselves.
* ``faults``: minor page faults (``getrusage``): pages the kernel mapped and zeroed on first touch, whose count
  depends on the allocator (:mod:`cost.allocator`), not on the load.

X from CPU time is therefore far less sensitive to load than X from wall time: descheduling does not count. It is
not immune: other jobs on the sibling cores share the caches and the memory bandwidth (and SMT siblings share a
core), and in a virtual machine time stolen by the host can be charged to the running process. The load detector
reports all of it (:func:`load_report`): load averages before and after, the CPU time other processes used during
the measurement, the host's steal time, the kernel's CPU pressure, and, per timed step, ``wall / cpu`` and the
run-queue wait, from which a run is called *quiet*, *shared* or *contaminated*.
"""

from __future__ import annotations

import os
import resource
import time
from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

RATIO_LIMIT = 1.05  # a step whose wall time exceeds its CPU time by more than 5% was descheduled
WAIT_LIMIT = 0.02  # a run that waited for a core more than 2% of its timed wall time is contaminated
OVER_LIMIT = 0.10  # ... or that has more than 10% of its steps over RATIO_LIMIT
STEAL_LIMIT = 0.02  # ... or whose virtual machine lost more than 2% of its CPU time to the host
OTHERS_LIMIT = 0.25  # other processes using more than a quarter of a core: the caches are shared ("shared")


def one_thread(threads: Optional[int] = 1) -> int:
    """``torch.set_num_threads(threads)`` (and one inter-op thread when it can still be set); returns the count."""
    if threads:
        torch.set_num_threads(threads)
        try:
            torch.set_num_interop_threads(1)
        except RuntimeError:  # already used: it can only be set before the first inter-op task
            pass
    return torch.get_num_threads()


def _schedstat_wait() -> Optional[int]:
    try:
        with open("/proc/thread-self/schedstat") as f:
            return int(f.read().split()[1])
    except (OSError, IndexError, ValueError):
        return None


def _preemptions_and_faults() -> Tuple[int, int]:
    """Involuntary context switches and minor page faults of the process so far (``getrusage``)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_nivcsw, usage.ru_minflt


@dataclass
class Sample:
    """One timed interval, in seconds (``preempt``: a count)."""

    wall: float
    cpu: float
    wait: Optional[float] = None
    preempt: Optional[int] = None
    faults: Optional[int] = None

    def get(self, clock: str) -> float:
        return getattr(self, clock)

    def as_dict(self) -> Dict[str, Any]:
        return asdict(self)


class Stamp:
    """The start of an interval; :meth:`since` closes it."""

    __slots__ = ("wall", "cpu", "wait", "preempt", "faults")

    def __init__(self) -> None:
        self.wait = _schedstat_wait()
        self.preempt, self.faults = _preemptions_and_faults()
        self.cpu = time.process_time()
        self.wall = time.perf_counter()

    def since(self) -> Sample:
        wall, cpu = time.perf_counter(), time.process_time()
        wait, (preempt, faults) = _schedstat_wait(), _preemptions_and_faults()
        return Sample(
            wall=wall - self.wall, cpu=cpu - self.cpu,
            wait=None if wait is None or self.wait is None else (wait - self.wait) * 1e-9,
            preempt=preempt - self.preempt, faults=faults - self.faults,
        )


# -- the system's view ----------------------------------------------------------------------------------------------


def _proc_stat() -> Optional[List[int]]:
    """The machine's CPU ticks: user nice system idle iowait irq softirq steal ..."""
    try:
        with open("/proc/stat") as f:
            return [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None


def _cpu_pressure() -> Optional[float]:
    """Seconds during which some task waited for a CPU (PSI ``/proc/pressure/cpu``, ``some total``)."""
    try:
        with open("/proc/pressure/cpu") as f:
            return int(f.readline().split("total=")[1]) * 1e-6
    except (OSError, IndexError, ValueError):
        return None


class LoadMonitor:
    """What the rest of the machine did between :meth:`__init__` and :meth:`finish`."""

    def __init__(self) -> None:
        self.loadavg_before = os.getloadavg()
        self._stat, self._psi = _proc_stat(), _cpu_pressure()
        self._cpu, self._wall = time.process_time(), time.perf_counter()
        self.rounds: List[Dict[str, Any]] = []

    def mark_round(self) -> None:
        """The 1-minute load average at the end of a round."""
        self.rounds.append(dict(loadavg1=os.getloadavg()[0]))

    def finish(self) -> Dict[str, Any]:
        wall, cpu = time.perf_counter() - self._wall, time.process_time() - self._cpu
        out: Dict[str, Any] = dict(loadavg_before=list(self.loadavg_before), loadavg_after=list(os.getloadavg()),
                                   seconds=wall, cores=os.cpu_count(), loadavg_rounds=[r["loadavg1"] for r in self.rounds])
        stat, psi = _proc_stat(), _cpu_pressure()
        if stat is not None and self._stat is not None:
            d = [b - a for a, b in zip(self._stat, stat)]
            hz = os.sysconf("SC_CLK_TCK")
            busy = (d[0] + d[1] + d[2] + d[5] + d[6]) / hz  # user nice system irq softirq, all cores
            total = sum(d[:8]) or 1
            out["others_cores"] = max(0.0, (busy - cpu) / wall)  # CPU used by other processes, in cores
            out["steal"] = d[7] / total if len(d) > 7 else 0.0
        if psi is not None and self._psi is not None:
            out["cpu_pressure"] = (psi - self._psi) / wall
        return out


def load_report(samples: Sequence[Sample], system: Dict[str, Any]) -> Dict[str, Any]:
    """The load verdict of a run from its timed steps and the system's view (:class:`LoadMonitor`).

    * ``contaminated``: the process was descheduled (run-queue wait above 2% of the timed wall time, or more than
      10% of the steps with ``wall / cpu > 1.05``) or the host stole more than 2% of the CPU: wall-time X are not
      trustworthy, CPU-time X are to be confirmed on a quiet machine;
    * ``shared``: not descheduled, but other processes used more than a quarter of a core meanwhile (other cores:
      the caches and memory bandwidth were shared): CPU-time X hold to first order;
    * ``quiet``: neither.
    """
    wall = sum(s.wall for s in samples) or 1e-12
    waits = [s.wait for s in samples if s.wait is not None]
    wait = sum(waits) / wall if len(waits) == len(samples) and samples else max(0.0, 1 - sum(s.cpu for s in samples) / wall)
    ratios = sorted(s.wall / max(s.cpu, 1e-12) for s in samples)
    over = sum(r > RATIO_LIMIT for r in ratios) / max(len(ratios), 1)
    out = dict(
        system,
        wait_fraction=wait,
        ratio_median=ratios[len(ratios) // 2] if ratios else float("nan"),
        ratio_max=ratios[-1] if ratios else float("nan"),
        steps_over=over,
        preemptions_per_step=sum(s.preempt or 0 for s in samples) / max(len(samples), 1),
    )
    reasons = []
    if wait > WAIT_LIMIT:
        reasons.append(f"waited for a core {100 * wait:.1f}% of the time")
    if over > OVER_LIMIT:
        reasons.append(f"{100 * over:.0f}% of the steps with wall/cpu > {RATIO_LIMIT}")
    if system.get("steal", 0.0) > STEAL_LIMIT:
        reasons.append(f"host steal {100 * system['steal']:.1f}%")
    if reasons:
        out["verdict"], out["reasons"] = "contaminated", reasons
    elif system.get("others_cores", 0.0) > OTHERS_LIMIT:
        out["verdict"] = "shared"
        out["reasons"] = [f"other processes used {system['others_cores']:.2f} cores meanwhile"]
    else:
        out["verdict"], out["reasons"] = "quiet", []
    return out


def clean_round(samples: Sequence[Sample]) -> bool:
    """A round none of whose steps was descheduled beyond :data:`RATIO_LIMIT`."""
    return all(s.wall <= RATIO_LIMIT * s.cpu for s in samples)

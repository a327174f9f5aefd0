"""Robot client: a fixed-rate control loop fed by a queue of action chunks from the server.

Time is counted in control steps (ticks of period 1 / rate_hz). Every tick the loop reads an
observation, asks for the next chunk *asynchronously* when the queue holds ``low_watermark`` or
fewer actions for the coming steps, and applies the action queued for the current step.

- Latency compensation: a reply carries ``step``, the tick of the observation it answers, so
  its action i belongs to tick ``step + i``. Actions whose tick has already passed when the reply
  arrives are dropped (counted in ``dropped``).
- Blending overlapping chunks: ``latest`` executes only the newest chunk (queued actions of
  older chunks are discarded), ``average`` mixes overlapping ticks as
  ``(1 - blend_weight) * old + blend_weight * new``.
- Starving (no action for the current tick): ``on_starve="wait"`` blocks until the pending
  reply arrives and pauses the schedule meanwhile (a simulator can stop time; a first chunk is
  always awaited), ``"hold"`` repeats the last action (what a real robot does).

numpy + the client library only: no torch on the robot.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from dppo.serving.client import InferResult, PolicyClient

BLEND_MODES = ("latest", "average")
STARVE_MODES = ("wait", "hold")


class ActionQueue:
    """Actions indexed by control step, filled chunk by chunk (pure logic, no clock)."""

    def __init__(self, blend: str = "latest", blend_weight: float = 0.5):
        if blend not in BLEND_MODES:
            raise ValueError(f"blend must be one of {BLEND_MODES}, got {blend!r}")
        if not 0.0 < blend_weight <= 1.0:
            raise ValueError(f"blend_weight must be in (0, 1], got {blend_weight}")
        self.blend = blend
        self.blend_weight = blend_weight
        self._actions: dict[int, np.ndarray] = {}
        self.dropped = 0

    def add(self, actions: np.ndarray, start_step: int, now_step: int) -> int:
        """Queue chunk ``actions`` (T, Da) for ticks start_step.. ; drop those before ``now_step``.

        Returns how many of the chunk's actions were stale.
        """
        stale = max(0, min(len(actions), now_step - start_step))
        self.dropped += stale
        fresh = {start_step + i: np.asarray(a) for i, a in enumerate(actions) if i >= stale}
        if self.blend == "latest":
            self._actions = fresh
            return stale
        w = self.blend_weight
        for step, new in fresh.items():
            old = self._actions.get(step)
            self._actions[step] = new if old is None else (1.0 - w) * old + w * new
        return stale

    def pop(self, step: int) -> np.ndarray | None:
        """The action for tick ``step`` (None if none is queued); earlier ones count as dropped."""
        for s in [s for s in self._actions if s < step]:
            del self._actions[s]
            self.dropped += 1
        return self._actions.pop(step, None)

    def remaining(self, step: int) -> int:
        """Queued actions for ticks >= ``step``."""
        return sum(1 for s in self._actions if s >= step)

    def clear(self) -> None:
        self._actions.clear()


class Robot(Protocol):
    """What the control loop drives: a real robot's driver, or a simulator (robot_sim)."""

    def observe(self) -> dict[str, np.ndarray]:
        """Current observation {key: (*shape)}."""
        ...

    def apply(self, action: np.ndarray) -> bool:
        """Apply one action (Da,) for one control period; True when the episode is over."""
        ...


@dataclass
class RobotConfig:
    rate_hz: float
    low_watermark: int = 1
    blend: str = "latest"
    blend_weight: float = 0.5
    on_starve: str = "wait"

    def __post_init__(self):
        if self.rate_hz <= 0:
            raise ValueError(f"rate_hz must be > 0, got {self.rate_hz}")
        if self.low_watermark < 0:
            raise ValueError(f"low_watermark must be >= 0, got {self.low_watermark}")
        if self.on_starve not in STARVE_MODES:
            raise ValueError(f"on_starve must be one of {STARVE_MODES}, got {self.on_starve!r}")
        ActionQueue(self.blend, self.blend_weight)  # validates blend settings


@dataclass
class EpisodeStats:
    """One episode of the control loop. Latencies in ms, one entry per reply."""

    steps: int = 0
    requests: int = 0
    dropped: int = 0
    held: int = 0
    overruns: int = 0
    wait_ms: float = 0.0
    rtt_ms: list[float] = field(default_factory=list)
    inference_ms: list[float] = field(default_factory=list)
    queue_ms: list[float] = field(default_factory=list)


class RobotClient:
    """Runs episodes of ``robot`` at ``cfg.rate_hz`` with chunks from ``client``.

    ``clock`` / ``sleep`` default to the wall clock; inference requests run on one background
    thread so the loop keeps its rate while a chunk is being computed.
    """

    def __init__(
        self,
        client: PolicyClient,
        cfg: RobotConfig,
        clock: Callable[[], float] = time.perf_counter,
        sleep: Callable[[float], None] = time.sleep,
    ):
        self.client = client
        self.cfg = cfg
        self.n_obs_steps = int(client.metadata["n_obs_steps"])
        self.clock = clock
        self.sleep = sleep
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="robot-infer")

    def close(self) -> None:
        self._executor.shutdown(wait=True)

    def __enter__(self) -> RobotClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _request(self, history: deque, step: int, reset: bool) -> Future:
        obs = {k: np.stack([o[k] for o in history]) for k in history[0]}
        return self._executor.submit(self.client.infer, obs, reset=reset, step=step)

    @staticmethod
    def _receive(reply: InferResult, queue: ActionQueue, step: int, stats: EpisodeStats) -> None:
        queue.add(reply.actions, reply.step, step)
        stats.rtt_ms.append(reply.rtt_ms)
        stats.inference_ms.append(reply.inference_ms)
        stats.queue_ms.append(reply.queue_ms)

    def run_episode(self, robot: Robot, max_steps: int) -> EpisodeStats:
        """Drive ``robot`` until it reports the episode over or ``max_steps`` ticks have run."""
        cfg, period = self.cfg, 1.0 / self.cfg.rate_hz
        queue = ActionQueue(cfg.blend, cfg.blend_weight)
        stats = EpisodeStats()
        history: deque = deque(maxlen=self.n_obs_steps)
        pending: Future | None = None
        last_action: np.ndarray | None = None
        deadline = self.clock()
        for step in range(max_steps):
            obs = robot.observe()
            if not history:
                history.extend([obs] * self.n_obs_steps)
            else:
                history.append(obs)
            if pending is not None and pending.done():
                self._receive(pending.result(), queue, step, stats)
                pending = None
            if pending is None and queue.remaining(step) <= cfg.low_watermark:
                pending = self._request(history, step, reset=step == 0)
                stats.requests += 1
            action = queue.pop(step)
            while action is None and (cfg.on_starve == "wait" or last_action is None):
                waited = self.clock()
                if pending is None:  # everything that arrived was stale: ask again
                    pending = self._request(history, step, reset=step == 0)
                    stats.requests += 1
                self._receive(pending.result(), queue, step, stats)
                pending = None
                paused = self.clock() - waited
                stats.wait_ms += paused * 1e3
                deadline += paused  # the schedule stands still while waiting
                action = queue.pop(step)
            if action is None:
                action = last_action
                stats.held += 1
            done = robot.apply(action)
            last_action = action
            stats.steps = step + 1
            if done:
                break
            deadline += period
            slack = deadline - self.clock()
            if slack > 0:
                self.sleep(slack)
            elif slack < -period:
                stats.overruns += 1
                deadline = self.clock()  # do not burst to catch up
        if pending is not None:
            pending.result()  # the reply of an abandoned request is not used
        stats.dropped = queue.dropped
        return stats

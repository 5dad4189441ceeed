"""Where grid points run: an `Executor` maps the runner's point function over specs and hands back each row as it
finishes (None: another worker holds that point, or its task was lost). The runner schedules, claims and records;
an executor only decides which process runs what. A new backend (Slurm, say) is one class."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from suite.errors import ConfigError
from suite.run.config import ExecutorConfig
from suite.run.grid import RunSpec
from suite.run.record import error_line

if TYPE_CHECKING:
    from suite.run.runner import Runner

log = logging.getLogger(__name__)
Row = dict[str, Any]


@dataclass(frozen=True)
class Point:
    """What a worker needs, besides the spec, to run one grid point as every other worker would."""

    fingerprint: str  # the model's
    dense: dict[str, float]  # the dense reference's metrics under this protocol
    started: int  # when this sweep started (ms): a failure recorded since is not retried twice


class Executor(Protocol):
    def map(self, runner: Runner, specs: list[RunSpec], point: Point) -> Iterator[tuple[RunSpec, Row | None]]:
        """Each spec with its table row, in the order they finish."""
        ...


class LocalExecutor:
    """This process, one point after another."""

    def map(self, runner: Runner, specs: list[RunSpec], point: Point) -> Iterator[tuple[RunSpec, Row | None]]:
        for spec in specs:
            yield spec, runner.point(spec, point)


class RayExecutor:
    """One Ray task per grid point, with the executor's resource request; each task runs the point exactly as a
    local worker would (claim, execute, record into the same tracking store). A task whose worker or node dies is
    retried (3 times; claims make a point idempotent); one lost for good comes back as None, and the runner then
    runs it itself."""

    def __init__(self, config: ExecutorConfig) -> None:
        self.config = config

    def map(self, runner: Runner, specs: list[RunSpec], point: Point) -> Iterator[tuple[RunSpec, Row | None]]:
        import ray

        ex = self.config
        with ray_session(ex):
            task = ray.remote(runner.in_task).options(num_cpus=ex.num_cpus, num_gpus=ex.num_gpus, max_retries=3)
            config = runner.exp.model_dump(mode="json")
            workdir = str(runner.workdir.resolve())
            futures = {task.remote(config, workdir, spec, point, runner.writers): spec for spec in specs}
            waiting = list(futures)
            while waiting:  # collected as they finish: one slow or lost task holds up no other result
                (future,), waiting = ray.wait(waiting, num_returns=1)
                spec = futures[future]
                try:
                    row = ray.get(future)
                except ray.exceptions.RayError as err:  # retries spent, or the task raised: the driver takes over
                    log.warning("%s: Ray task lost after its retries (%s); this worker runs it", spec.name,
                                error_line(err))
                    row = None
                yield spec, row


@contextlib.contextmanager
def ray_session(ex: ExecutorConfig) -> Iterator[None]:
    """Ray for the block: the cluster at `executor.address`, or a local instance bound to 127.0.0.1 (shut down
    after the block; a Ray already initialised in this process is used as it is)."""
    import ray

    ours = not ray.is_initialized()
    if ours and ex.address in (None, "local"):
        ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=False, log_to_driver=False)
    elif ours:
        try:
            ray.init(address=ex.address, log_to_driver=False)
        except Exception as err:  # Ray raises ConnectionError, RuntimeError, ... for an unreachable cluster
            raise ConfigError(f"executor.address {ex.address!r}: cannot join the Ray cluster: "
                              f"{error_line(err)}") from None
    try:
        yield
    finally:
        if ours:
            ray.shutdown()


def executor_for(config: ExecutorConfig) -> Executor:
    return RayExecutor(config) if config.kind == "ray" else LocalExecutor()

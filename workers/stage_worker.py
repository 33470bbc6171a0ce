"""Pipeline stages as Ray actors: one StageWorker per stage, and RayPipeline, which starts them
and submits forward passes through them (an Engine's stage_runner, workers/engine/pipeline.py).

The stages are placed by a placement group of one bundle per stage (STRICT_PACK: one node,
by default; PACK or SPREAD across nodes). Each actor maps the model file and loads only its
layers. The actors are chained as a Ray compiled graph (`ray.dag`): a pass's inputs (the
step, the last stage's draws) go to every stage, each stage's output (the float32 residual
stream) to the next through the graph's channels (shared memory within a host), and only the
last stage's output comes back: the sampled tokens of a pass whose draws it was given, else
the logits. Ray's task path cost a P = 2 pass ~3-4 ms (a `ray.put`, two actor calls, a
`ray.get`); the graph ~0.2 ms (docs/benchmarks.md). `submit` returns without waiting: each
stage runs its passes one at a time in submission order, so a pass submitted behind another
follows it down the stages, stage k running the later pass while stage k + 1 runs the
earlier one (the scheduler's micro-batches).

A stage that dies is restarted by Ray (up to STAGE_RESTARTS times) with an empty KV cache, and
the graph stops for good. A stage that hangs (a process stopped or deadlocked, a wedged
device) would hold its passes forever: a pass not back in pass_timeout_s kills the stages that
do not answer or run the oldest pass, and Ray restarts them as after a crash. The passes the
stage was in raise StageFailed, and so does a pass that reaches a restarted stage before the
pipeline knows (its KV for every running sequence is gone): the engine's caller ends those
sequences (the ComputeWorker fails every running request). The pass submitted after a failure first builds the graph again, once every stage
answers, and tells the stages with it that the sequences they lost are ended (a quantized KV
cache's calibrated key transforms go with it, which a restarted stage lost). A pipeline whose
driver died leaves its placement group behind; the next pipeline to start removes it
(`reap_orphaned_groups`).
"""

from __future__ import annotations

import math
import time
import uuid
from typing import NamedTuple

import ray
from ray.exceptions import ActorUnavailableError, GetTimeoutError, RayChannelError, RayChannelTimeoutError, RayError
from ray.dag import InputNode
from ray.util.placement_group import get_placement_group, placement_group, placement_group_table, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from kernels import StepInputs, get_backend
from workers.engine.kv_calibration import Transforms
from workers.engine.pipeline import PASS_TIMEOUT_S, Stage, StageSpec
from workers.engine.sampling import Draw
from workers.host_tier import NAMESPACE
from workers.node_tiers import NodeTiers

STAGE_RESTARTS = 3
STRATEGIES = ("STRICT_PACK", "PACK", "SPREAD")
START_TIMEOUT_S = 600.0  # placing the bundles and loading every stage's layers (or a restarted stage's)
PING_TIMEOUT_S = 5.0  # after a pass timed out, a stage that does not answer in this is stuck
GROUP_PREFIX = "ntr-stages-"  # the pipelines' placement groups (`reap_orphaned_groups`)
ORPHAN_AGE_S = 10.0  # a group this old without stage actors has lost its driver
REAP_EVERY_S = 2.0  # while a pipeline waits for room, orphaned groups are looked for this often


class StageFailed(RuntimeError):
    """A pipeline stage died or failed during a pass; the running sequences' KV is lost."""


class PassInputs(NamedTuple):
    """What every stage is given for a pass."""

    step: StepInputs
    draws: list[Draw | None] | str | None  # the last stage's, one a logit row, or TOP2 (`Stage.step`)
    ended: bool  # every sequence a stage lost has ended since the last pass: a restarted stage serves again
    transforms: Transforms  # with ended, the calibrated key transforms, which a restarted stage lost
    calibrate: bool  # the KV calibration pass (`Stage.step`)
    layers: tuple[int, ...] | None  # a draft's subset of the model's layers (`Stage.step`; None: every layer)
    moves: tuple[tuple[int, int], ...]  # KV slots copied first, (src, dst) (`Stage.step`: kept draft-tree leaves)


@ray.remote(max_restarts=STAGE_RESTARTS)
class StageWorker:
    def __init__(self, spec: StageSpec):
        ops = get_backend(spec.backend)
        # this process is the stage's; its pool is capped as planned, not by what the device has in
        # use at its start (other stages may share the GPU, and their memory is not this stage's)
        ops.limit_device_memory(spec.pool_limit)
        # its streamed layers' images in its node's host tier (one copy for every stage on the node
        # that streams the same images) and, past its share of host RAM, a disk tier of its own
        self.tiers = NodeTiers(spec.model_path, tag=f"-stage{spec.index}")
        self.stage = Stage(spec, ops, self.tiers.host_alloc, self.tiers.disk_open)
        self.tiers.loaded()
        # a restart begins with an empty KV cache: it refuses passes until told the sequences are ended
        self.lost_kv = ray.get_runtime_context().was_current_actor_reconstructed
        self.pass_started: float | None = None  # when the pass running here began (`running_for`)

    def ready(self) -> str:
        """The actor's id (hex), which Ray's errors about its death carry, once it is loaded."""
        return ray.get_runtime_context().get_actor_id()

    def running_for(self) -> float | None:
        """Seconds the pass running here has taken so far; None between passes. Answered beside
        a running pass: the graph's loop runs in a concurrency group of its own."""
        started = self.pass_started
        return None if started is None else time.monotonic() - started

    def step(self, inputs: PassInputs, hidden=None):
        """One pass's work here. A failure names this stage."""
        name = self.stage.spec.describe()
        self.pass_started = time.monotonic()
        try:
            if inputs.ended:
                self.stage.install_transforms(inputs.transforms)
                self.lost_kv = False
            if self.lost_kv:
                raise StageFailed(f"pipeline {name} failed: it was restarted: its KV cache is lost")
            return self.stage.step(inputs.step, hidden, inputs.draws, inputs.calibrate, inputs.layers, inputs.moves)
        except StageFailed:
            raise
        except Exception as e:
            raise StageFailed(f"pipeline {name} failed: {type(e).__name__}: {e}") from None
        finally:
            self.pass_started = None


class RayPass:
    """A pass submitted to the stages: the last stage's output to come."""

    def __init__(self, pipeline: RayPipeline, output):
        self.pipeline, self.output = pipeline, output

    def result(self):
        """The last stage's output (StageFailed, naming the stage, when one fails or hangs)."""
        try:
            return self.output.get(timeout=self.pipeline.pass_timeout_s)
        except RayChannelTimeoutError:
            self.pipeline.failed = True
            raise self.pipeline.stuck() from None
        except RayError as e:
            self.pipeline.failed = True
            cause = getattr(e, "cause", None)  # a stage's own StageFailed, which names it
            raise (StageFailed(str(cause)) if isinstance(cause, StageFailed) else self.pipeline.failure(e)) from None


class RayPipeline:
    """The stages of `specs` as `worker` actors (StageWorker's interface) in a placement group,
    chained by a Ray compiled graph; submit(step) starts a pass. Each stage reserves num_cpus
    and num_gpus (GPU stages: a GPU each, or a share of one that several stages use). A pass
    not back in pass_timeout_s is stuck (`stuck`)."""

    # a pass's time beyond its stages' compute, by backend, as LocalPipeline's. cupy: the real
    # default model on an H100, two stages at half the GPU each, 0.64 -> 1.58 ms a step (the
    # compiled graph's channels, and two CUDA contexts time-slicing the one GPU). numpy: none
    # counted (LocalPipeline's reason); the CPU actors' loss beside one process (46 -> 69 ms a
    # step on the 2-core machine) is their BLAS contending with the driver's, every pass alike.
    PASS_OVERHEAD_SECONDS = {"numpy": 0.0, "cupy": 0.94e-3}

    def __init__(self, specs: list[StageSpec], strategy: str = "STRICT_PACK", num_cpus: float = 1.0,
                 timeout_s: float = START_TIMEOUT_S, worker=StageWorker, num_gpus: float = 0.0,
                 pass_timeout_s: float = PASS_TIMEOUT_S):
        if strategy not in STRATEGIES:
            raise ValueError(f"placement_strategy {strategy!r}: choose one of {', '.join(STRATEGIES)}")
        self.specs, self.timeout_s, self.pass_timeout_s = specs, timeout_s, pass_timeout_s
        bundle = {"CPU": num_cpus, "GPU": num_gpus} if num_gpus else {"CPU": num_cpus}
        prefix = f"ntr-{uuid.uuid4().hex[:8]}"
        reap_orphaned_groups()
        self.group = placement_group([dict(bundle) for _ in specs], strategy=strategy, name=group_name(prefix))
        # the actors at once, pending until the group is placed: their names tell a reaper that
        # the group has a live driver (`reap_orphaned_groups`)
        self.actors = [worker.options(
            name=stage_name(prefix, spec.index), namespace=NAMESPACE, num_cpus=num_cpus, num_gpus=num_gpus,
            scheduling_strategy=PlacementGroupSchedulingStrategy(self.group, placement_group_bundle_index=spec.index),
        ).remote(spec) for spec in specs]
        deadline, placed = time.monotonic() + timeout_s, self.group.ready()
        while not ray.wait([placed], timeout=REAP_EVERY_S)[0]:
            if time.monotonic() > deadline:
                self.shutdown(graph=False)
                raise RuntimeError(f"no room in the Ray cluster for {len(specs)} pipeline stages of {bundle} each "
                                   f"({strategy}) after {timeout_s:.0f} s")
            reap_orphaned_groups()  # a dead worker's stages may hold what these wait for
        self.actor_ids = ray.get([a.ready.remote() for a in self.actors], timeout=timeout_s)  # kept across restarts
        self.graph = self._compile()
        self.failed = False
        self.transforms: Transforms = {}  # the KV calibration's, sent again after a failure

    def _compile(self):
        """The stages chained as a compiled graph: the pass's inputs to every stage, each
        stage's output to the next (shared-memory channels within a host), the last one's
        back. A pass costs Ray ~0.2 ms there against ~3-4 ms as actor tasks (docs/benchmarks.md).
        execute() waits at most timeout_s for room in the graph's input channel."""
        with InputNode() as inputs:
            out = None
            for actor in self.actors:
                out = actor.step.bind(inputs) if out is None else actor.step.bind(inputs, out)
        return out.experimental_compile(_submit_timeout=self.timeout_s)

    def submit(self, step: StepInputs, draws: list[Draw | None] | str | None = None, calibrate: bool = False,
               layers: tuple[int, ...] | None = None, moves: tuple[tuple[int, int], ...] = ()) -> RayPass:
        """Start a pass of step through every stage (the last drawing the tokens when given
        draws; a draft's over `layers` only, when given; each stage first making the KV
        moves, `Stage.step`); returns at once. After a failure the graph is built again first,
        the stages told that the sequences they held are ended (the caller has ended them) and
        given the KV calibration's transforms again."""
        ended, self.failed = self.failed, False
        if ended:
            self._rebuild()
        inputs = PassInputs(step, draws, ended, self.transforms if ended else {}, calibrate, layers, moves)
        try:
            output = self.graph.execute(inputs)
        except RayChannelError as e:  # the graph stopped: one of its stages died since the last pass
            if isinstance(e, RayChannelTimeoutError):
                raise
            self._rebuild()
            output = self.graph.execute(inputs)
        return RayPass(self, output)

    def calibrate(self, step: StepInputs) -> None:
        """The KV calibration pass: each stage calibrates its layers; their transforms are kept."""
        self.transforms = self.submit(step, calibrate=True).result().transforms

    def _rebuild(self) -> None:
        """A new graph over the stages, once each answers (Ray restarts a dead one, and
        answers ActorUnavailableError meanwhile): a graph stops for good when one of its
        actors dies, and one with a pass left unread is built again too."""
        self.graph.teardown()
        deadline = time.monotonic() + self.timeout_s
        for actor, spec in zip(self.actors, self.specs):
            while True:
                try:
                    ray.get(actor.ready.remote(), timeout=max(1.0, deadline - time.monotonic()))
                    break
                except ActorUnavailableError:
                    if time.monotonic() > deadline:
                        raise StageFailed(f"pipeline {spec.describe()} did not restart in {self.timeout_s:.0f} s") from None
                    time.sleep(0.1)
                except RayError as e:
                    raise StageFailed(f"pipeline {spec.describe()} did not come back: {e}") from None
        self.graph = self._compile()

    def failure(self, error: RayError) -> StageFailed:
        """The stage a system error came from (a dead actor names itself), and why."""
        actor_id = getattr(error, "actor_id", None)
        for known, spec in zip(self.actor_ids, self.specs):
            if known == actor_id:
                return StageFailed(f"pipeline {spec.describe()} failed: {type(error).__name__}: {error}")
        return StageFailed(f"a pipeline stage failed: {type(error).__name__}: {error}")

    def stuck(self) -> StageFailed:
        """After a pass outlived pass_timeout_s: the stages that do not answer within
        PING_TIMEOUT_S (a stopped or deadlocked process) and the one running the oldest pass
        (it holds the pass up) are killed; Ray restarts them with their KV lost, as after a
        crash, and the next pass builds the graph again. The error names them."""
        pings = [actor.running_for.remote() for actor in self.actors]
        deadline = time.monotonic() + PING_TIMEOUT_S
        running: list[float | None] = []  # inf: no answer
        for ping in pings:
            try:
                running.append(ray.get(ping, timeout=max(0.0, deadline - time.monotonic())))
            except (GetTimeoutError, RayError):
                running.append(math.inf)
        oldest = max((r for r in running if r is not None), default=None)
        reasons = []
        for actor, spec, r in zip(self.actors, self.specs, running):
            if r is not None and r in (oldest, math.inf):
                ray.kill(actor, no_restart=False)
                reasons.append(f"pipeline {spec.describe()} " + (
                    "did not answer" if r == math.inf else f"had run it for {r:.1f} s"))
        return StageFailed(f"a pass did not finish in {self.pass_timeout_s:g} s (step_timeout_s): "
                           + ("; ".join(reasons) + ": restarted" if reasons else "no stage was running it"))

    def shutdown(self, graph: bool = True) -> None:
        if graph:
            self.graph.teardown()
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        remove_placement_group(self.group)


def group_name(prefix: str) -> str:
    """A pipeline's placement group's name: its actors' prefix and when it is made."""
    return f"{GROUP_PREFIX}{prefix}@{int(time.time())}"


def stage_name(prefix: str, index: int) -> str:
    return f"{prefix}-stage-{index}"


def reap_orphaned_groups(min_age_s: float = ORPHAN_AGE_S) -> list[str]:
    """Remove the pipelines' placement groups that no stage actor of theirs is left in, made at
    least min_age_s ago (a pipeline names its actors just after its group); returns their names.
    Ray keeps the placement group an actor made until the actor's job ends, not the actor
    (ray-project/ray#65881): a ComputeWorker that dies (killed, its replica restarted by Serve)
    takes its stage actors with it (they are its own) but would leave their group holding its
    GPUs, and a worker started in its place would wait for them forever."""
    removed = []
    for info in placement_group_table().values():
        name = info.get("name") or ""
        if not name.startswith(GROUP_PREFIX) or info.get("state") == "REMOVED":
            continue
        prefix, _, created = name[len(GROUP_PREFIX):].rpartition("@")
        if not created.isdigit() or time.time() - int(created) < min_age_s:
            continue
        if any(actor_exists(stage_name(prefix, i)) for i in range(len(info.get("bundles") or {}))):
            continue
        try:
            remove_placement_group(get_placement_group(name))
        except ValueError:  # removed meanwhile
            continue
        removed.append(name)
    return removed


def actor_exists(name: str) -> bool:
    try:
        ray.get_actor(name, namespace=NAMESPACE)
        return True
    except ValueError:
        return False

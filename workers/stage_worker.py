"""Pipeline stages as Ray actors: one StageWorker per stage, and RayPipeline, which starts them
and submits forward passes through them (an Engine's stage_runner, workers/engine/pipeline.py).

The stages are placed by a placement group of one bundle per stage (STRICT_PACK: one node,
by default; PACK or SPREAD across nodes). Each actor maps the model file and loads only its
layers. A pass puts the step's inputs in Ray's object store once and hands every stage the
reference; each stage's output (the float32 residual stream, the last stage's logits) is an
object the next stage takes as an argument, so activations move through Ray's own objects
(shared memory within a host), straight from stage to stage, and only the last stage's
output comes back: the sampled tokens of a pass whose draws it was given, else the logits.
`submit` returns without waiting: an actor runs its calls one at a time in submission order,
so a pass submitted behind another follows it down the stages, stage k running the later
pass while stage k + 1 runs the earlier one (the scheduler's micro-batches).

A stage that dies is restarted by Ray (up to STAGE_RESTARTS times) with an empty KV cache.
The passes it was in raise StageFailed, and so does a pass that reaches a restarted stage
before the pipeline knows (its KV for every running sequence is gone): the engine's caller
ends those sequences (the ComputeWorker fails every running request). The pass submitted
after that first tells the restarted stages that the sequences they lost are ended, and runs.
"""

from __future__ import annotations

import time
import uuid

import numpy as np
import ray
from ray.exceptions import ActorUnavailableError, GetTimeoutError, RayError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from kernels import StepInputs
from workers.engine.pipeline import Stage, StageSpec
from workers.engine.sampling import Draw

STAGE_RESTARTS = 3
STRATEGIES = ("STRICT_PACK", "PACK", "SPREAD")
START_TIMEOUT_S = 600.0  # placing the bundles and loading every stage's layers (or a restarted stage's)


class StageFailed(RuntimeError):
    """A pipeline stage died or failed during a pass; the running sequences' KV is lost."""


@ray.remote(max_restarts=STAGE_RESTARTS)
class StageWorker:
    def __init__(self, spec: StageSpec):
        self.stage = Stage(spec)
        # a restart begins with an empty KV cache: it refuses passes until told the sequences are ended
        self.lost_kv = ray.get_runtime_context().was_current_actor_reconstructed

    def ready(self) -> str:
        return self.stage.spec.describe()

    def step(self, step: StepInputs, hidden: np.ndarray | None, draws: list[Draw | None] | None = None):
        if self.lost_kv:
            raise StageFailed(f"{self.stage.spec.describe()} was restarted: its KV cache is lost")
        return self.stage.step(step, hidden, draws)

    def sequences_ended(self) -> None:
        """Every sequence whose KV this stage lost has ended: the next pass may run."""
        self.lost_kv = False


class RayPass:
    """A pass submitted to the stages: each stage's output, the last one the logits or picks."""

    def __init__(self, pipeline: RayPipeline, outputs: list):
        self.pipeline, self.outputs = pipeline, outputs

    def result(self):
        """The last stage's output (StageFailed, naming the stage, when one fails)."""
        try:
            return ray.get(self.outputs[-1])
        except RayError:
            self.pipeline.failed = True
            raise self.pipeline.failure(self.outputs) from None


class RayPipeline:
    """The stages of `specs` as `worker` actors (StageWorker's interface) in a placement group;
    submit(step) starts a pass. Each stage reserves num_cpus and num_gpus (GPU stages: a GPU
    each, or a share of one that several stages use)."""

    def __init__(self, specs: list[StageSpec], strategy: str = "STRICT_PACK", num_cpus: float = 1.0,
                 timeout_s: float = START_TIMEOUT_S, worker=StageWorker, num_gpus: float = 0.0):
        if strategy not in STRATEGIES:
            raise ValueError(f"placement_strategy {strategy!r}: choose one of {', '.join(STRATEGIES)}")
        self.specs, self.timeout_s = specs, timeout_s
        bundle = {"CPU": num_cpus, "GPU": num_gpus} if num_gpus else {"CPU": num_cpus}
        self.group = placement_group([dict(bundle) for _ in specs], strategy=strategy)
        try:
            ray.get(self.group.ready(), timeout=timeout_s)
        except GetTimeoutError:
            remove_placement_group(self.group)
            raise RuntimeError(f"no room in the Ray cluster for {len(specs)} pipeline stages of {bundle} each "
                               f"({strategy}) after {timeout_s:.0f} s") from None
        prefix = f"ntr-{uuid.uuid4().hex[:8]}"
        self.actors = [worker.options(
            name=f"{prefix}-stage-{spec.index}", num_cpus=num_cpus, num_gpus=num_gpus,
            scheduling_strategy=PlacementGroupSchedulingStrategy(self.group, placement_group_bundle_index=spec.index),
        ).remote(spec) for spec in specs]
        ray.get([a.ready.remote() for a in self.actors], timeout=timeout_s)
        self.failed = False

    def submit(self, step: StepInputs, draws: list[Draw | None] | None = None) -> RayPass:
        """Start a pass of step through every stage (the last drawing the tokens when given
        draws); returns at once."""
        if self.failed:  # the caller has ended every sequence the stages held
            self._sequences_ended()
            self.failed = False
        inputs = ray.put(step)
        outputs, hidden = [], None
        for actor in self.actors:
            hidden = actor.step.remote(inputs, hidden, draws if actor is self.actors[-1] else None)
            outputs.append(hidden)
        return RayPass(self, outputs)

    def _sequences_ended(self) -> None:
        """Tell every stage that the sequences in flight are ended, waiting for a restarting
        one to come back (Ray answers ActorUnavailableError meanwhile)."""
        deadline = time.monotonic() + self.timeout_s
        for actor, spec in zip(self.actors, self.specs):
            while True:
                try:
                    ray.get(actor.sequences_ended.remote(), timeout=max(1.0, deadline - time.monotonic()))
                    break
                except ActorUnavailableError:
                    if time.monotonic() > deadline:
                        raise StageFailed(f"pipeline {spec.describe()} did not restart in {self.timeout_s:.0f} s") from None
                    time.sleep(0.1)
                except RayError as e:
                    raise StageFailed(f"pipeline {spec.describe()} did not come back: {e}") from None

    def failure(self, outputs) -> StageFailed:
        """The first stage whose output failed, and why (the later ones failed for lack of its output)."""
        for spec, ref in zip(self.specs, outputs):
            try:
                ray.get(ref)
            except RayError as e:
                cause = e.cause if getattr(e, "cause", None) is not None else e
                return StageFailed(f"pipeline {spec.describe()} failed: {type(cause).__name__}: {cause}")
        return StageFailed("a pipeline stage failed")

    def shutdown(self) -> None:
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        remove_placement_group(self.group)

"""Serving configuration: a Ray Serve config file whose app args are checked here.

`configs/*.yaml` are ordinary Serve config files (so `serve run configs/x.yaml` works), and
the `args` of an application built by `cluster.app:build_app` are a `ServerConfig`. Both
layers are validated when loaded, and every error names the file and the field.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from kernels.kv_layout import KV_TYPES
from workers.model import store as model_store
from workers.model.config import ModelConfig
from workers.engine.pipeline import PASS_TIMEOUT_S
from workers.engine.speculation import MAX_K
from workers.model.gguf_file import GGUFFile

APP_IMPORT_PATH = "cluster.app:build_app"


class ConfigError(ValueError):
    pass


class ServerConfig(BaseModel):
    """One replica: one model on one device, its KV cache and its admission limits."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = model_store.DEFAULT_MODEL  # a registered name (pulled if missing) or a GGUF path
    served_model_name: str | None = None  # the `model` clients send; default: the registered name or file stem
    backend: Literal["numpy", "cupy"] = "numpy"
    # the compute worker's GPU (cupy: 1); with pipeline_parallel_size > 1 each stage's (1, or a
    # share that packs stages onto fewer GPUs), the compute worker then holding none
    num_gpus: float = Field(0, ge=0, le=1)
    num_cpus: float = Field(1, gt=0)  # reserved for the compute worker, and for each pipeline stage
    # the forward pass in P stage actors, the layers split by bytes (workers/engine/pipeline.py);
    # placed by a placement group of one bundle per stage with placement_strategy; each stage
    # is a device of its own under vram_budget_gb
    pipeline_parallel_size: int = Field(1, ge=1)
    placement_strategy: Literal["STRICT_PACK", "PACK", "SPREAD"] = "STRICT_PACK"
    # everything the replica holds on its device; layers that do not fit stream from host RAM
    # (workers/engine/placement.py), and the KV cache takes what is left when kv_cache_gb is not given
    vram_budget_gb: float = Field(24.0, gt=0)
    kv_cache_gb: float | None = Field(None, gt=0)
    # the KV cache's type (kernels/kv_layout.py): the backend's default (numpy f32, cupy f16),
    # or RotateKV's rotated q8/q4/q3/q2, which hold 1.7-5.3x the tokens in the same bytes
    kv_type: Literal["f32", "f16", "q8", "q4", "q3", "q2"] | None = None
    # the streamed layers requantized as they load (workers/engine/requant_streamed.py): "auto" or a K-quant type
    requant_streamed: Literal["auto", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"] | None = None
    # host RAM for streamed layers (default: what the node has; with stages, theirs together); the rest streams from disk
    host_ram_gb: float | None = Field(None, gt=0)
    n_buffers: int | None = Field(None, ge=1, le=16)  # VRAM slots streamed layers pass through (default: chosen)
    max_context: int = Field(4096, ge=16)
    block_size: int = Field(16, ge=1, le=1024)
    max_num_seqs: int = Field(32, ge=1)
    max_batch_tokens: int = Field(512, ge=1)  # per step: decodes first, prompt chunks share the rest
    max_queue: int = Field(256, ge=0)  # waiting requests beyond this get 429 / RESOURCE_EXHAUSTED
    # a forward pass not done in this is stuck: a pipeline restarts the stage holding it; 30 s
    # past it the replica fails its requests and its health checks, and Serve replaces it
    step_timeout_s: float = Field(PASS_TIMEOUT_S, gt=0)
    api_keys: list[str] = []  # bearer keys; NTR_API_KEYS (comma-separated) adds more
    # speculative decoding for the requests that can (no penalties, grammar or bias;
    # workers/engine/speculation.py): K tokens drafted a pass, or auto (k and plain steps chosen
    # per pass from each request's acceptance), by the drafter named; greedy output is unchanged
    speculate: Literal["off", "auto"] | Annotated[int, Field(ge=1, le=MAX_K)] = "off"
    drafter: Literal["lookup", "early-exit", "skip", "auto"] = "lookup"
    draft_layers: int | None = Field(None, ge=1)  # early exit: layers the drafter runs (default: the resident ones)
    skip_set: str | None = None  # the skip drafter's layers: a file of `ntr calibrate-skip`, kept resident first
    # greedy model drafts also verify the drafter's runner-up at each drafted position (auto: where it pays)
    draft_tree: Literal["auto", "on", "off"] = "auto"

    @field_validator("speculate", mode="before")
    @classmethod
    def _yaml_off(cls, value):
        if isinstance(value, bool):  # YAML 1.1 reads a bare off as false (and on as true)
            if value:
                raise ValueError(f"speculate must be off, auto or a number of tokens in [1, {MAX_K}], got true")
            return "off"
        return value

    @model_validator(mode="after")
    def _consistent(self) -> "ServerConfig":
        if self.backend == "cupy" and self.pipeline_parallel_size == 1 and self.num_gpus != 1:
            raise ValueError("backend 'cupy' needs num_gpus: 1 (one replica = one GPU)")
        if self.backend == "cupy" and self.num_gpus == 0:
            raise ValueError("backend 'cupy' with pipeline_parallel_size > 1 needs num_gpus > 0: each stage's GPU "
                             "(1) or share of one")
        if self.backend == "cupy" and self.kv_type == "f32":
            raise ValueError("kv_type 'f32' is the numpy backend's; backend 'cupy' stores f16, q8, q4, q3 or q2")
        if self.pipeline_parallel_size > 1:
            n_layers = self._model_layers()
            if n_layers is not None and self.pipeline_parallel_size > n_layers:
                raise ValueError(f"pipeline_parallel_size ({self.pipeline_parallel_size}) must be <= the model's "
                                 f"{n_layers} layers")
        if self.speculate != "off" and self.draft_tree == "on" and self.kv_type and KV_TYPES[self.kv_type].quantized:
            raise ValueError(f"draft_tree 'on': a RotateKV cache (kv_type {self.kv_type!r}) does not verify "
                             "draft trees (its ring holds one row a position, so a kept leaf's KV cannot move); "
                             "use auto or off")
        if self.drafter == "skip" and self.skip_set is None:
            raise ValueError("drafter 'skip' needs skip_set (a file of ntr calibrate-skip)")
        if self.max_batch_tokens < self.max_num_seqs:
            raise ValueError(f"max_batch_tokens ({self.max_batch_tokens}) must be >= max_num_seqs "
                             f"({self.max_num_seqs}) so that every running decode fits in a step")
        return self

    def _model_layers(self) -> int | None:
        """The model file's layer count where the file is here already (else the engine checks
        pipeline_parallel_size when it loads the model)."""
        try:
            path = model_store.resolve(self.model)
        except model_store.ModelNotFound:
            return None
        with GGUFFile(path) as gguf:
            return ModelConfig.from_gguf(gguf).n_layers

    @property
    def name(self) -> str:
        if self.served_model_name:
            return self.served_model_name
        return self.model if self.model in model_store.REGISTRY else Path(self.model).stem

    @property
    def stage_gpus(self) -> float:
        """The GPU each pipeline stage reserves (none on the CPU backend, or without stages)."""
        return self.num_gpus if self.backend == "cupy" and self.pipeline_parallel_size > 1 else 0.0

    def worker_options(self) -> dict:
        """Ray resources of the compute worker: a driver of GPU stages holds no GPU (kernels/driver.py)."""
        return {"num_cpus": self.num_cpus, "num_gpus": 0.0 if self.stage_gpus else self.num_gpus}

    def worker_args(self) -> dict:
        """ComputeWorker's constructor arguments."""
        return self.model_dump(include={"model", "backend", "max_context", "kv_cache_gb", "kv_type", "vram_budget_gb",
                                        "block_size", "max_num_seqs", "max_batch_tokens", "max_queue", "host_ram_gb",
                                        "n_buffers", "requant_streamed", "pipeline_parallel_size",
                                        "placement_strategy", "num_cpus", "speculate", "drafter", "draft_layers",
                                        "skip_set", "draft_tree", "step_timeout_s"}) | {"stage_gpus": self.stage_gpus}


def describe(error: ValidationError, where: str) -> str:
    lines = []
    for e in error.errors():
        loc = ".".join(str(p) for p in e["loc"])
        lines.append(f"{where}{'.' + loc if loc else ''}: {e['msg']}")
    return "\n".join(lines)


def server_config(args: dict, where: str = "args") -> ServerConfig:
    try:
        return ServerConfig.model_validate(args or {})
    except ValidationError as e:
        raise ConfigError(describe(e, where)) from None


def load(path: str | Path) -> tuple[dict, list[ServerConfig]]:
    """A Serve config file -> (the file as a dict, the ServerConfig of each ntransformer app)."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    return raw, validate(raw, str(path))


def validate(raw, where: str) -> list[ServerConfig]:
    """Check a Serve config (as Serve would) and the args of each ntransformer app in it."""
    from ray.serve.schema import ServeDeploySchema

    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping with 'applications', got {type(raw).__name__}")
    try:
        ServeDeploySchema.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(describe(e, where)) from None
    apps = [(i, app) for i, app in enumerate(raw["applications"]) if app.get("import_path") == APP_IMPORT_PATH]
    if not apps:
        raise ConfigError(f"{where}: no application with import_path {APP_IMPORT_PATH}")
    return [server_config(app.get("args"), f"{where}: applications.{i}.args") for i, app in apps]

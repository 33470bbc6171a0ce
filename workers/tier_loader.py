"""TierLoader: the Ray actor that owns one memory tier's copy of the model weights.

This is the disk tier: it makes sure the GGUF file is on the node (pulling a registered
model into NTR_HOME if it is missing, so a fresh node or pod installs it once) and checks
it before a ComputeWorker spends memory on it. The compute worker, placed on the same
node, then maps the file itself; the layer-streaming work extends this actor to hand
layer bytes to the host-RAM tier ahead of need.
"""

from __future__ import annotations

import ray

from workers.model import store as model_store
from workers.model.gguf_file import GGUFFile
from workers.model.config import ModelConfig


@ray.remote(num_cpus=0)
class TierLoader:
    def __init__(self, model: str | None):
        self.model = model or model_store.DEFAULT_MODEL

    def load(self) -> dict:
        """The local path of a checked GGUF file, its size and the shapes that size the KV cache."""
        registered = self.model in model_store.REGISTRY
        path = model_store.pull(self.model) if registered else model_store.resolve(self.model)
        with GGUFFile(path) as gguf:
            config = ModelConfig.from_gguf(gguf)
            config.check_tensors(gguf)
        return {"path": str(path), "bytes": path.stat().st_size, "n_layers": config.n_layers,
                "n_kv_heads": config.n_kv_heads, "head_dim": config.head_dim, "context_length": config.context_length}

"""TierLoader: the Ray actor that puts the model file on the compute worker's node.

It makes sure the GGUF file is on the node (pulling a registered model into NTR_HOME when it
is missing, so a fresh node or pod installs it once) and checks its header and tensors
before a ComputeWorker spends device memory on it. The ComputeWorker, placed on the same
node, then maps the file itself; layers it streams live in the node's HostTier and, past
host RAM, behind a DiskTier (workers/node_tiers.py).
"""

from __future__ import annotations

import ray

from workers.model import store as model_store
from workers.model.config import ModelConfig
from workers.model.gguf_file import GGUFFile


@ray.remote(num_cpus=0)
class TierLoader:
    def __init__(self, model: str | None):
        self.model = model or model_store.DEFAULT_MODEL

    def load(self) -> dict:
        """The local path of a checked GGUF file and its size in bytes."""
        registered = self.model in model_store.REGISTRY
        path = model_store.pull(self.model) if registered else model_store.resolve(self.model)
        with GGUFFile(path) as gguf:
            ModelConfig.from_gguf(gguf)  # checks every tensor against the architecture table
        return {"path": str(path), "bytes": path.stat().st_size}

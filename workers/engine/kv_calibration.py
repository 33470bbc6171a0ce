"""The per-channel key transform of a RotateKV cache, calibrated on the model itself.

Keys carry channels far off zero (Qwen2.5's first layer: channels near -145 and +135, with a
spread of 0.3, from its key bias), and queries weigh some channels far more than others. A
quantized key row's range, and so its error, is set by its largest values; the error costs
in proportion to the query weights it meets. So before the rotation each key is centred and
scaled per channel (kernels/kv_quant.py): centre = the channel's mean key, which every
query's scores then lose equally (the softmax ignores it), and scale = (E[q^2] / Var[k])^(1/4)
per channel, which equalises the score error each channel contributes (q / scale meets
k * scale, so the product is unchanged); the scales' geometric mean is one.

The statistics come from one forward pass of CALIBRATION_TEXT (a prefill from scratch, in
which the cache reads every key unquantized), so they are the model's own. The text is this
project's own (never an evaluation text: GPL-3, Apache-2.0). Each layer's transform depends on
its own statistics alone, so pipeline stages calibrate their layers in the one pass that runs
through them all and get what one process gets (workers/engine/pipeline.py).
"""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np

from kernels.kv_layout import RECENT

Transforms = dict[int, tuple[np.ndarray, np.ndarray]]  # a layer's (centre, scale) [n_kv_heads, head_dim], by index

CALIBRATION_TEXT = """\
The workshop opened at seven, before the street had woken. Mara lit the stove, set the kettle
on it and read the list the night shift had left: two clocks to clean, a bicycle wheel to true,
and a radio that hummed whenever anyone touched its case. She started with the radio, because
a hum is a question and she liked questions better than chores.

def moving_average(values, window):
    \"\"\"Mean of each run of `window` consecutive values.\"\"\"
    if window <= 0:
        raise ValueError(f"window must be positive, got {window}")
    total = sum(values[:window])
    out = [total / window]
    for i in range(window, len(values)):
        total += values[i] - values[i - window]
        out.append(total / window)
    return out

Rainfall in the valley is measured at three stations. In March the northern gauge recorded
41 mm, the central one 38 mm and the southern one 55 mm, so the regional mean was 44.7 mm,
about twelve percent above the ten-year average. Farmers planted a week earlier than usual.

SELECT customer_id, COUNT(*) AS orders, SUM(total) AS spent
FROM orders WHERE created_at >= '2024-01-01'
GROUP BY customer_id HAVING COUNT(*) > 3 ORDER BY spent DESC LIMIT 20;

"Could you tell me the way to the harbour?" asked the traveller. The old man pointed down the
hill with his pipe. "Follow the tram lines until you smell the fish, then turn left at the
blue door. If you reach the lighthouse you have gone too far, but the view is worth it."

struct Point { double x, y; };
static double dist(struct Point a, struct Point b) {
    double dx = a.x - b.x, dy = a.y - b.y;
    return sqrt(dx * dx + dy * dy);
}

A good recipe for bread needs flour, water, salt and time. Mix 500 g of flour with 350 ml of
water, rest it for half an hour, add 10 g of salt and a little yeast, then fold the dough every
forty minutes for three hours. Bake it hot, at 240 degrees, for about forty minutes.
"""


class KeyStatistics:
    """Sums of the post-RoPE keys and squared queries each layer's attention sees, per KV head
    and channel (a Backend's kv_observer while the calibration pass runs)."""

    def __init__(self, layer_of: dict[int, int], n_layers: int, n_kv_heads: int, head_dim: int, to_numpy):
        self.layer_of, self.to_numpy = layer_of, to_numpy
        shape = (n_layers, n_kv_heads, head_dim)
        self.k, self.k2, self.q2 = np.zeros(shape), np.zeros(shape), np.zeros(shape)
        self.n = np.zeros(n_layers)

    def __call__(self, k_cache, q, k, keep) -> None:
        """q [T, heads, D], k [T, kv_heads, D] (backend arrays) of the rows where `keep` (host
        bool [T]) is set: the sink (position 0) is left out, as its key is unlike the others."""
        layer = self.layer_of[id(k_cache)]
        rows = np.flatnonzero(keep)
        q, k = self.to_numpy(q)[rows].astype(np.float64), self.to_numpy(k)[rows].astype(np.float64)
        T, H, D = q.shape
        self.k[layer] += k.sum(0)
        self.k2[layer] += (k * k).sum(0)
        self.q2[layer] += (q * q).reshape(T, k.shape[1], H // k.shape[1], D).mean(2).sum(0)
        self.n[layer] += T

    def transforms(self) -> tuple[np.ndarray, np.ndarray]:
        """(centre, scale) [n_layers, n_kv_heads, head_dim] float32; a variance floor a
        millionth of the layer's largest, so that no layer's transform depends on another's."""
        n = np.maximum(self.n, 1)[:, None, None]
        center = self.k / n
        var = np.maximum(self.k2 / n - center ** 2, 0)
        q2 = self.q2 / n
        floor = 1e-6 * np.maximum(var.max(axis=(1, 2), keepdims=True), 1e-30)
        scale = ((q2 + 1e-30) / (var + floor)) ** 0.25
        scale = np.clip(scale / np.exp(np.log(scale).mean(-1, keepdims=True)), 1 / 64, 64)
        return center.astype(np.float32), scale.astype(np.float32)


@contextmanager
def calibrating(ops, caches: dict[int, tuple], config, tokens: int):
    """While the calibration pass of `tokens` tokens runs in the block: `ops` observes the keys
    and queries of the layers whose (K, V) `caches` holds (by layer index), which read every key
    unquantized. After it, each of those layers' K cache takes its centre and scale. Yields
    the transforms as they will be installed: a dict filled after the block, by layer index."""
    stats = KeyStatistics({id(k): i for i, (k, _) in caches.items()}, config.n_layers, config.n_kv_heads,
                          config.head_dim, ops.to_numpy)
    ops.kv_observer = stats
    for k, v in caches.values():
        k.recent_window = v.recent_window = tokens
    installed: Transforms = {}
    try:
        yield installed
    finally:
        ops.kv_observer = None
        for k, v in caches.values():
            k.recent_window = v.recent_window = RECENT
    center, scale = stats.transforms()
    installed.update({i: (center[i], scale[i]) for i in caches})
    install(ops, caches, installed)


def install(ops, caches: dict[int, tuple], transforms: Transforms) -> None:
    """Each held layer's K cache takes its (centre, scale) from transforms (by layer index)."""
    for i, (k, _) in caches.items():
        k.center[...] = ops.asarray(transforms[i][0])
        k.scale[...] = ops.asarray(transforms[i][1])

"""Which layers the skip drafter passes over: a deterministic greedy search on a calibration
text (one that no evaluation uses), and the JSON file that carries its answer.

The text is a file, or calibration prompts each followed by the model's greedy continuation
(`own_continuations`): what a draft predicts is what the model writes. On the default model
the two kinds of text chose sets that keep about as many tokens a pass. What mattered was
reading a few hundred tokens and rescoring (docs/benchmarks.md). The model reads the text
once, teacher-forced, for its own next-token choices (the reference).
A candidate skip set reads it again with those layers passed over, and is scored by how often
its top-1 token equals the reference's (the draft's acceptance under greedy decoding), ties
broken by the mean KL(reference || draft) over the positions. The search adds one layer a
round, the one whose skipping hurts least, until the target share of the layers is skipped.
Round one scores every layer; later rounds rescore only the `candidates` best of the last
scores (a lazy greedy: skipping a layer rarely gets less harmful as more go), so a round costs
`candidates` teacher-forced reads rather than one per layer left. With candidates=0 nothing is
rescored: the layers are taken in round one's order (one read per layer in all; what a
loaded 2-core machine affords).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from workers.engine.engine import Sequence
from workers.engine.sampling import SamplingParams
from workers.model.config import ModelConfig
from workers.model.gguf_file import GGUFFile

MAX_CALIBRATION_TOKENS = 2048


def own_continuations(engine, prompts: list[str], tokens: int, limit: int) -> list[int]:
    """Calibration ids: each prompt (as a plain prompt) followed by the model's own greedy
    continuation of `tokens` tokens, in order, until `limit` ids are held (cut there)."""
    if not 1 <= tokens <= engine.max_context:
        raise ValueError(f"continuation tokens must be in 1..{engine.max_context}, got {tokens}")
    params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
    ids: list[int] = []
    for text in prompts:
        if len(ids) >= limit:
            break
        prompt = engine.prompt_ids(text)
        ids += prompt + [t.token_id for t in engine.generate(prompt, params) if t.token_id is not None]
    return ids[:limit]


def read_prompts(path: str | Path) -> list[str]:
    """A calibration prompt file: a JSON list of non-empty strings."""
    try:
        prompts = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"calibration prompts {path}: {e}") from None
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) and p for p in prompts):
        raise ValueError(f"calibration prompts {path}: expected a JSON list of non-empty strings")
    return prompts


def _read(engine, ids: list[int], layers: tuple[int, ...] | None) -> np.ndarray:
    """Log-probabilities [len(ids), vocab] of the model's `layers` (every layer if None), teacher-forced."""
    seq = Sequence(list(ids))
    try:
        engine.reserve([(seq, len(ids))])
        logits = engine.forward([(seq, len(ids))], all_logits=True, layers=layers)
    finally:
        engine.release(seq)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def score(reference: np.ndarray, draft: np.ndarray) -> tuple[float, float]:
    """(top-1 agreement, mean KL(reference || draft)) of two log-probability arrays [positions, vocab]."""
    agree = float(np.mean(reference.argmax(-1) == draft.argmax(-1)))
    kl = float(np.mean(np.sum(np.exp(reference) * (reference - draft), axis=-1)))
    return agree, kl


def calibrate(engine, ids: list[int], fraction: float, candidates: int = 6, progress=None) -> dict:
    """The skip set for `fraction` of the engine's layers, chosen on the teacher-forced ids; the
    answer as `write`/`load_skip_set` carry it: the set and the order layers were added in,
    with the agreement and KL of the set after each addition as last scored (candidates=0: of
    that layer skipped alone)."""
    n = engine.config.n_layers
    if not 0 < fraction < 1:
        raise ValueError(f"skip fraction must be in (0, 1), got {fraction}")
    if not 2 <= len(ids) <= min(MAX_CALIBRATION_TOKENS, engine.max_context, engine.max_batch_tokens):
        raise ValueError(f"calibration needs 2 to {min(MAX_CALIBRATION_TOKENS, engine.max_context, engine.max_batch_tokens)}"
                         f" tokens (one forward pass), got {len(ids)}")
    if candidates < 0:
        raise ValueError(f"candidates must be >= 0, got {candidates}")
    target = max(1, min(n - 1, round(fraction * n)))
    reference = _read(engine, ids, None)
    skipped: list[int] = []
    last: dict[int, tuple[float, float]] = {}  # layer -> its latest (agreement, KL) as an addition
    order = []
    for step in range(target):
        left = [i for i in range(n) if i not in skipped]
        if step > 0:  # the best by their last scores (ties: the lower layer)
            left = sorted(left, key=lambda i: (-last[i][0], last[i][1], i))[:max(candidates, 1)]
        for i in left if step == 0 or candidates else ():
            run = tuple(j for j in range(n) if j not in skipped and j != i)
            last[i] = score(reference, _read(engine, ids, run))
            if progress:
                progress(f"skip {sorted(skipped + [i])}: agreement {last[i][0]:.3f}, KL {last[i][1]:.3f}")
        best = min(left, key=lambda i: (-last[i][0], last[i][1], i))
        agree, kl = last.pop(best)
        skipped.append(best)
        order.append({"layer": best, "agreement": round(agree, 4), "kl": round(kl, 4)})
    return {"model": engine.model_name, "n_layers": n, "tokens": len(ids), "fraction": fraction,
            "skip": sorted(skipped), "order": order}


def write(path: str | Path, result: dict, source: dict) -> None:
    """result with where its text came from (`{"text": file}` or the prompts file and tokens)."""
    Path(path).write_text(json.dumps({**result, **source}, indent=1) + "\n")


def _read_file(path: str | Path, n_layers: int) -> tuple[list[int], list[int]]:
    """(the layers in the order the search skipped them, the skip set) of a calibration file."""
    try:
        data = json.loads(Path(path).read_text())
        order = [int(o["layer"]) for o in data["order"]]
        skip, file_layers = [int(i) for i in data["skip"]], int(data["n_layers"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"skip set {path}: not a calibrate-skip file ({e})") from None
    if file_layers != n_layers:
        raise ValueError(f"skip set {path} was calibrated for {file_layers} layers; this model has {n_layers}")
    if sorted(set(order)) != sorted(skip) or len(order) != len(skip) or not all(0 <= i < n_layers for i in skip):
        raise ValueError(f"skip set {path}: its order {order} and set {skip} disagree")
    return order, skip


def load_skip_set(path: str | Path, n_layers: int, count: int | None = None) -> tuple[int, ...]:
    """The layers a calibration file says to skip (with count, the first count it chose), for a
    model of n_layers."""
    order, skip = _read_file(path, n_layers)
    if count is not None:
        if not 1 <= count <= len(order):
            raise ValueError(f"skip set {path} holds {len(order)} layers in order; asked for the first {count}")
        skip = order[:count]
    return tuple(sorted(skip))


def residency_order(path: str | Path, model_path: str | Path) -> tuple[int, ...]:
    """The order a streamed placement gives the layers of the model at model_path residency
    for a calibration file's skip drafter (placement.place): the layers the draft runs first,
    so it copies nothing over the link; then the skipped ones, those whose skipping hurt most
    first (the search's order reversed)."""
    with GGUFFile(model_path) as gguf:
        n_layers = ModelConfig.from_gguf(gguf).n_layers
    order, _ = _read_file(path, n_layers)  # the order holds the skip set (_read_file checks)
    return tuple(i for i in range(n_layers) if i not in order) + tuple(reversed(order))

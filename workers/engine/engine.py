"""The engine: one model, its tokenizer and KV cache, and the loop from ids to tokens.

`forward` advances any set of sequences by any number of tokens each in one batched pass;
`generate` (one request) and `score` (teacher forcing) are built on it, and so is the
serving scheduler's continuous batching.
"""

from __future__ import annotations

import functools
import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from kernels import AttentionBatch, Backend, StepInputs, get_backend
from kernels.driver import get_driver
from kernels.ops import fed_tokens
from workers.engine.block_manager import BlockManager, slot
from workers.engine.grammar import Constraint, GrammarSpec, GrammarTokenizer
from workers.engine.kv_cache import PagedKVCache, sliding_pool
from workers.engine.kv_calibration import CALIBRATION_TEXT, calibrating
from workers.engine.draft_policy import DraftMemory, DraftPolicy
from workers.engine.pipeline import (TOP2, Finished, KVPools, LocalPipeline, plan_stages, staged_pass,
                                     stages_step_seconds)
from workers.engine.placement import Rates, context_bytes, plan_model, requantized, stage_reserve
from workers.engine.requant_streamed import check_spec, retyped
from workers.engine.sampling import Draw, Sampler, SamplingParams, draw_rows, log_softmax, logprob_picks
from workers.engine.speculation import Speculation, start_verify
from workers.engine.speculation import Stats as SpecStats
from workers.engine.text_stream import TextStream
from workers.model.chat_template import chat_template_from_metadata, render_chat
from workers.model.config import ModelConfig
from workers.model.gguf_file import GGUFFile
from workers.model.quant_recipe import Q
from workers.model.tokenizer import Tokenizer
from workers.model.tool_calls import check_tool_format
from workers.model.transformer import Transformer, layer_matrices

DEFAULT_MAX_CONTEXT = 4096
GREEDY_DRAW = SamplingParams(temperature=0.0)  # a greedy draft step's draw, taken by a pipeline's last stage
log = logging.getLogger("ntransformer")


class ContextLengthError(ValueError):
    """A prompt, or a prompt and the max_tokens asked for, that does not fit the context window;
    param names the request field to change (None: the prompt)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


@dataclass
class Sequence:
    token_ids: list[int]
    num_cached: int = 0  # leading tokens whose K/V are in the cache
    block_table: list[int] = field(default_factory=list)
    recent_slot: int = -1  # its slot of a RotateKV cache's recent ring (BlockManager)
    sliding_table: list[int] = field(default_factory=list)  # the sliding layers' pool's blocks, -1: given back
    sliding_freed: int = 0  # leading entries of sliding_table given back


@dataclass
class GeneratedToken:
    token_id: int | None  # None for the final event when a stop string ended the text
    text: str  # text released by this token (may be empty while a character or stop string is incomplete)
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    finish_reason: str | None = None  # "stop" | "length" once generation ends


@dataclass
class PromptLogprobs:
    """Every prompt token's (token, logprob, top) (SamplingParams.prompt_logprobs), the first's
    logprob and top None: a request's event before its first token's."""

    entries: list[tuple[int, float | None, list[tuple[int, float]] | None]]


@dataclass(eq=False)
class Completion:
    """One request's generation state, shared by `Engine.generate` and the serving scheduler:
    its sequence, sampler, text stream, stop ids and token budget, and with prompt_logprobs
    its prompt tokens' logprobs as the passes over its prompt score them."""

    seq: Sequence
    params: SamplingParams
    sampler: Sampler
    stream: TextStream
    stop_ids: frozenset[int]
    budget: int  # tokens it may generate: max_tokens, cut to what the context window leaves
    prompt_tokens: int
    generated: int = 0
    prompt_scores: list[tuple] = field(default_factory=list)  # PromptLogprobs' entries so far
    prompt_sent: bool = False

    @classmethod
    def start(cls, engine: "Engine", prompt_ids: list[int], params: SamplingParams, **extra) -> "Completion":
        """A checked prompt's state (ContextLengthError/ValueError for bad input)."""
        engine.check_prompt(prompt_ids, params)
        tok = engine.tokenizer
        constraint = None if params.grammar is None else engine.constraint(params.grammar)
        return cls(seq=Sequence(list(prompt_ids)), params=params, sampler=Sampler(params, constraint),
                   stream=TextStream(tok, params.stop),
                   stop_ids=frozenset(params.stop_ids) | (frozenset() if params.ignore_eos else frozenset(tok.stop_ids)),
                   budget=min(params.max_tokens, engine.max_context - len(prompt_ids)),
                   prompt_tokens=len(prompt_ids),
                   prompt_scores=[] if params.prompt_logprobs is None else [(prompt_ids[0], None, None)], **extra)

    def score_rows(self, n: int) -> range:
        """Of the next n tokens a pass feeds it, the rows (0 its first) whose logits give a
        prompt token's logprob not computed yet: row j predicts token seq.num_cached + j + 1.
        Those of a prompt recomputed after preemption are not computed again."""
        if self.params.prompt_logprobs is None:
            return range(0)
        cached = self.seq.num_cached
        return range(max(len(self.prompt_scores) - 1 - cached, 0), max(min(n, self.prompt_tokens - 1 - cached), 0))

    def prompt_event(self) -> PromptLogprobs | None:
        """Once every prompt token has its logprob, the event that hands them out; once."""
        if self.params.prompt_logprobs is None or self.prompt_sent or len(self.prompt_scores) < self.prompt_tokens:
            return None
        self.prompt_sent = True
        return PromptLogprobs(self.prompt_scores)

    def advance(self, token: int, logprob: float | None = None, top=None) -> GeneratedToken:
        """The event for a sampled token: a stop id, a stop string or the budget ends the
        completion (finish_reason set); otherwise the token joins the sequence."""
        stream = self.stream
        self.generated += 1
        if token in self.stop_ids:
            return GeneratedToken(token, stream.finish(), logprob, top, "stop")
        text = stream.push(token)
        if stream.stopped:
            return GeneratedToken(token, text, logprob, top, "stop")
        if self.generated >= self.budget:
            return GeneratedToken(token, text + stream.finish(), logprob, top, "length")
        self.seq.token_ids.append(token)
        return GeneratedToken(token, text, logprob, top)


@dataclass
class Timings:
    prompt_tokens: int = 0
    prefill_s: float = 0.0
    decode_tokens: int = 0
    decode_s: float = 0.0

    @property
    def prefill_tok_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s else 0.0

    @property
    def decode_tok_s(self) -> float:
        return self.decode_tokens / self.decode_s if self.decode_s else 0.0


def last_rows(work: list[tuple[Sequence, int]]) -> np.ndarray:
    """The row of each sequence's last new token in a pass of work: the rows whose logits a
    pass returns by default."""
    return np.cumsum([n for _, n in work], dtype=np.int64) - 1


def count_cached(work: list[tuple[Sequence, int]]) -> None:
    """The sequences count a started pass's tokens as cached."""
    for seq, n in work:
        seq.num_cached += n


class Engine:
    def __init__(self, model_path: str | Path, backend: str | Backend = "numpy", max_context: int | None = None,
                 kv_cache_tokens: int | None = None, kv_cache_bytes: int | None = None, block_size: int = 16,
                 vram_budget: int | None = None, n_buffers: int | None = None, host_ram: int | None = None,
                 rates: Rates | None = None, max_batch_tokens: int = 512, max_logit_rows: int = 32,
                 host_alloc=None, disk_open=None, kv_type: str | None = None,
                 requant_streamed: str | None = None, pipeline_parallel_size: int = 1, stage_runner=None,
                 resident_order: tuple[int, ...] | None = None):
        """The KV cache holds kv_cache_tokens tokens, or as many as kv_cache_bytes of the
        backend's KV layout of kv_type (kernels/kv_layout.py; the backend's default if None)
        hold (at least one context), or one context. With vram_budget
        (bytes) the model is placed under it (workers/engine/placement.py): layers that do not
        fit stream from host memory through n_buffers slots (chosen if None), and without a
        KV size the cache takes what the budget leaves when every layer is resident. Streamed
        images live in host_alloc(nbytes, content) (pinned memory of the backend's if None) and, past
        host_ram, in the disk tier that disk_open({layer: nbytes}) opens (`Backend.stream_layers`).
        max_batch_tokens and max_logit_rows (tokens a step takes, rows of logits it returns)
        size the activations the budget keeps room for. requant_streamed ("auto" or a K-quant
        type): the streamed layers' matrices are requantized as they load
        (workers/engine/requant_streamed.py), so each pass copies fewer bytes. resident_order:
        the order layers claim residency when some stream (`placement.place`; the first layers
        if None), through stages each stage's layers in that order.

        With pipeline_parallel_size P > 1 the forward pass runs in P stages, the layers split
        by bytes (workers/engine/pipeline.py); this engine then holds no weights and no KV, only
        the block tables every stage's pools share, and the last stage draws the tokens; its
        own ops are the host's, sized as `backend` stores the model (kernels/driver.py).
        vram_budget is then each stage's (a device each); without a KV size the pools take
        the most blocks with which every stage fits it, and a stage it cannot hold streams the
        layers it does not (`plan_stages`), requantized as they load where requant_streamed says.
        stage_runner(specs) starts the stages (workers/stage_worker.py: Ray actors; default:
        `LocalPipeline`, in this process). A model draft's steps run through them as passes over
        its layers (`_pipeline_chain`), and a kept leaf's KV moves in each stage at the start of
        the next pass (`move_kv`)."""
        check_spec(requant_streamed, "requant_streamed")
        self.gguf = GGUFFile(model_path)
        self.config = ModelConfig.from_gguf(self.gguf)
        self.tokenizer = Tokenizer.from_metadata(self.gguf.metadata, source=str(self.gguf.path))
        if isinstance(backend, str):  # a driver of stages runs no layer: sized as `backend`, nothing on a device
            self.ops = get_driver(backend) if pipeline_parallel_size > 1 else get_backend(backend)
        else:
            self.ops = backend
        self.max_context = min(self.config.context_length, max_context or DEFAULT_MAX_CONTEXT)
        c = self.config
        layout = self.ops.kv_layout(c.n_kv_heads, c.head_dim, block_size, kv_type)
        # layers with a window keep their rows in a pool of their own, sized for every sequence a
        # step holds (max_logit_rows), each its window and a prompt chunk (workers/engine/kv_cache.py)
        sliding, window, sliding_cap = sliding_pool(c, block_size, max_logit_rows, max_batch_tokens)
        if kv_cache_bytes is not None:
            num_blocks = PagedKVCache.blocks_within(kv_cache_bytes, c.n_layers, layout, max_logit_rows, len(sliding),
                                                    sliding_cap)
            if num_blocks * block_size < self.max_context and len(sliding) < c.n_layers:
                raise ValueError(
                    f"a KV cache of {max(kv_cache_bytes, 0) / 2**30:.2f} GiB holds {num_blocks * block_size} tokens, "
                    f"less than one {self.max_context}-token context; raise kv_cache_gb/vram_budget_gb or lower "
                    "max_context")
            kv_cache_tokens = num_blocks * block_size
        self.rates = rates or Rates()
        self._grammar_tokenizer: GrammarTokenizer | None = None
        self._grammar_lock = threading.Lock()
        self.link = None

        # measured, not assumed: a context past the estimate would take the pool past the budget
        context = context_bytes(self.ops.outside_pool_bytes())

        staged = staged_pass(pipeline_parallel_size, c.n_layers)

        def placed():  # staged: every layer resident, each stage under the budget (plan_stages below)
            return plan_model(self.gguf, c, self.ops, None if staged else vram_budget, kv_cache_tokens,
                              self.max_context, block_size, max_batch_tokens, max_logit_rows,
                              None if staged else host_ram, n_buffers,
                              self.rates, kv_type, requant_streamed, context, resident_order)

        self.max_batch_tokens, self.max_logit_rows = max_batch_tokens, max_logit_rows
        self.placement = placed()
        if self.placement.streamed and rates is None and (link := self.ops.host_link()) is not None:
            self.link = link  # the slots are chosen from the measured link
            self.rates = replace(self.rates, link_gb_s=link["h2d_gb_s"], source={
                "link_gb_s": f"pinned copy, {'cached' if link['cached'] else 'measured'} {link['measured_at']}"})
            self.placement = placed()
        # the process's pool: an engine without a budget lifts an earlier one's limit; the context
        # takes the rest of the budget (the graphs' own pools are planned inside the reserve, and
        # until they exist their share is the pool's slack)
        self.ops.limit_device_memory(None if vram_budget is None or staged else vram_budget - context)
        self.ops.allow_prompt_graphs(self.placement.prompt_graph_bytes)
        if self.placement.requant:  # the model as loaded: streamed matrices requantized as they load
            self.gguf = retyped(self.gguf, {n: Q[t] for n, t in self.placement.requant.items()})
        if self.placement.streamed:
            p = self.placement
            schedule = p.schedule()
            log.info("placement: %d layers resident, %d streamed from RAM, %d from disk through %d slots of %.1f MiB "
                     "(%s); link %s", len(p.tiers) - len(p.streamed), p.tiers.count("ram"), p.tiers.count("disk"),
                     p.n_buffers, p.slot_bytes / 2**20, p.why_buffers, self.link)
            self.ops.stream_layers(schedule, {i: layer_matrices(self.gguf, c, i) for i in schedule.streamed},
                                   [i for i, t in enumerate(p.tiers) if t == "disk"], host_alloc, disk_open)
        num_blocks = -(-self.placement.kv_tokens // block_size)
        sliding_blocks = min(sliding_cap, num_blocks)  # a sequence holds no more sliding blocks than main ones
        if sliding and len(sliding) == c.n_layers:  # no rows in the main pool: it only numbers positions
            num_blocks = max(num_blocks, max_logit_rows * -(-self.max_context // block_size))
        self.stages = []
        if staged:  # the stages' pools are sized (grown to what the budget leaves) before the block tables
            pools = KVPools(layout, max_logit_rows, sliding, sliding_cap)
            self.stages = plan_stages(str(self.gguf.path), self.ops.name, self.placement.sizes,
                                      pipeline_parallel_size, pools, num_blocks, kv_type, vram_budget,
                                      stage_reserve(self.placement), kv_cache_tokens is None, self.rates, n_buffers,
                                      context, host_ram, requant_streamed and functools.partial(
                                          requantized, gguf=self.gguf, config=c, sizer=self.ops,
                                          spec=requant_streamed, context=context), resident_order)
            num_blocks, sliding_blocks = self.stages[0].num_blocks, self.stages[0].sliding_blocks
        # a RotateKV ring slot for each sequence a step may hold
        self.kv = PagedKVCache(self.ops, c.n_layers, layout, num_blocks, max_logit_rows, sliding, sliding_blocks,
                               held=range(0) if staged else None)
        self.model = None if staged else Transformer(self.gguf, self.config, self.ops,
                                                     embed_on_host=self.placement.embed_on_host)
        self.pipeline = (stage_runner or LocalPipeline)(self.stages) if staged else None
        self._kv_moves: list[tuple[int, int]] = []  # a pipeline's, for its next pass (`move_kv`)
        self.blocks = BlockManager(num_blocks, block_size, self.kv.recent_slots, self.kv.sliding_blocks, window)
        if layout.type.quantized:
            self._calibrate_kv()
        self.last_timings = Timings()
        self.last_speculation = SpecStats()
        self.draft_memory = DraftMemory()  # what greedy speculative requests measured, for the next

    def _calibrate_kv(self) -> None:
        """A RotateKV cache's key centre and scale per layer, from the model's own keys and
        queries on the calibration text (workers/engine/kv_calibration.py); through pipeline
        stages each stage calibrates its layers in the one pass, which the pipeline keeps
        the transforms of (for a stage restarted later)."""
        ids = self.prompt_ids(CALIBRATION_TEXT)[:min(self.max_context, self.max_batch_tokens)]
        seq = Sequence(ids)
        work = [(seq, len(ids))]
        try:
            self.reserve(work)
            if self.pipeline is not None:
                step = self._plan(work)
                step.logit_rows = last_rows(work)
                self.pipeline.calibrate(step)
            else:
                with calibrating(self.ops, self.kv.by_layer, self.config, len(ids)):
                    self.forward(work)
        finally:
            self.release(seq)

    @property
    def model_name(self) -> str:
        return self.gguf.metadata.get("general.name") or self.gguf.path.stem

    # --- prompts ------------------------------------------------------------------
    def prompt_ids(self, text: str) -> list[int]:
        """A plain prompt: BOS as the model's metadata says; special-token text stays text."""
        return self.tokenizer.encode(text, add_special=True, parse_special=False)

    def chat_prompt_ids(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        """Messages rendered with the GGUF's chat template (sandboxed), special tokens parsed.
        tools: OpenAI tool definitions for the template's tools branch (ValueError when the
        template has none, or writes calls in another format than <tool_call> blocks)."""
        tok = self.tokenizer
        bos = tok.decode([tok.bos_id]) if tok.bos_id is not None else ""
        eos = tok.decode([tok.eos_id]) if tok.eos_id is not None else ""
        template = chat_template_from_metadata(self.gguf.metadata)
        text = render_chat(template, messages, add_generation_prompt=True, bos_token=bos, eos_token=eos,
                           tools=tools or None)
        if tools:
            check_tool_format(template, text, tools)
        # Templates that write the BOS text themselves must not get a second one.
        ids = tok.encode(text, add_special=False, parse_special=True)
        if tok.add_bos and tok.bos_id is not None and ids[:1] != [tok.bos_id]:
            ids.insert(0, tok.bos_id)
        return ids

    # --- batched forward ------------------------------------------------------
    def reserve(self, work: list[tuple[Sequence, int]]) -> None:
        """KV blocks for each sequence's next n tokens (OutOfBlocks when the cache is full): what
        a driver of `forward` does first. The serving scheduler reserves through `self.blocks`
        itself, as it decides what to do when blocks run out."""
        for seq, n in work:
            self.blocks.reserve(seq, seq.num_cached + n)

    def forward(self, work: list[tuple[Sequence, int]], all_logits: bool = False, device: bool = False,
                rows: np.ndarray | None = None, layers: tuple[int, ...] | None = None,
                decode_rows: bool = False, leaves: list[list[tuple[int, int]]] | None = None) -> np.ndarray:
        """Feed each sequence its next n uncached tokens, all in one pass.

        Their KV blocks must be reserved (`self.blocks`) for the tokens they will hold.
        Returns float32 logits on the host: the last new row of each sequence, with
        all_logits every new row in batch order, or the given rows of the flat batch of new
        tokens. With device=True they stay a backend array (valid until the next forward),
        for `ops.argmax` / `ops.sample` / `ops.token_logprobs` on the device. With `layers`
        (ascending layer indices), the logits of those layers only, the others passed over (a
        draft: `range(d)` exits early, a calibrated subset skips; only their KV is written).
        With decode_rows, each sequence's tokens are rows of a decode step (`_plan`): the same
        logits, from the step a batch of that many sequences decodes with (a verifying pass),
        and with `leaves` a draft tree's leaf rows after each sequence's (`_plan`).
        """
        return self.start_forward(work, all_logits, device, rows, layers, decode_rows, leaves)()

    def start_forward(self, work: list[tuple[Sequence, int]], all_logits: bool = False, device: bool = False,
                      rows: np.ndarray | None = None, layers: tuple[int, ...] | None = None,
                      decode_rows: bool = False, leaves: list[list[tuple[int, int]]] | None = None,
                      before_draft: bool = False, feed: list | None = None,
                      best: bool = False, head: bool = True) -> Callable[[], np.ndarray]:
        """`forward`'s pass, started: returns a function that waits for its logits. Through
        pipeline stages the pass is submitted and runs while the caller goes on, so a pass of
        other sequences started behind it runs in the stages it has left (micro-batches,
        workers/engine/scheduler.py); in one process it runs here (on the GPU: is launched).
        The sequences count the pass's tokens as cached when this returns. before_draft: a
        draft of resident layers comes next (a verifying pass), which the streamed layers'
        copies for the pass after may run beside (kernels/layer_ring.py `late`). feed: ids on
        the device that the sequences' negative tokens name (`Backend.run_step`; a draft's
        proposals, `start_chain`). best (with device): through pipeline stages, each logit row's
        argmax and runner-up ids ([2, rows] on the host: the last stage's `TOP2`) instead of its
        logits, for a greedy verifying pass that reads nothing else (one process keeps the logits
        on the device, where the argmax is found beside them, and ignores it). head=False (with
        device, one process): the rows' residual stream leaving the last layer instead of their
        logits, for `Transformer.head` to take a few rows at a time (`start_scored`)."""
        step = self._plan(work, decode_rows=decode_rows, leaves=leaves)
        if rows is not None:
            step.logit_rows = np.asarray(rows, dtype=np.int64)
        elif not all_logits:
            if leaves:
                raise ValueError("a pass with leaf rows returns every row's logits (all_logits)")
            step.logit_rows = last_rows(work)
        if self.pipeline is not None:
            if not head:
                raise ValueError("through pipeline stages a pass returns its last stage's logits or draws")
            if feed is not None:  # a draft's ids, which a pipeline's chain (`start_chain`) holds on the host
                step.tokens = fed_tokens(step.tokens, feed)
            result = self._submit(step, TOP2 if best else None, layers=self._draft_layers(layers)).result
        else:
            result = Finished(self.ops.run_step(self._forward(layers, before_draft, head), step, self.kv.layers,
                                                feed)).result
        count_cached(work)
        if device:
            return result
        return lambda: self.ops.to_numpy(result()).astype(np.float32, copy=False)

    def start_sampled(self, work: list[tuple[Sequence, int]],
                      samplers: list[Sampler | None]) -> Callable[[], list[tuple[int, float | None, list | None] | None]]:
        """A pass of work started (`start_forward`'s), and each sequence's next token drawn from
        its last new row by its sampler (None: none drawn): returns a function that waits for
        `sample`'s picks. Through pipeline stages the last stage draws them beside its logits
        (`Draw`s made here, sent with the pass), so only the picks come back, not a row of
        vocabulary-wide logits a sequence."""
        if self.pipeline is None:
            logits = self.start_forward(work, device=True)
            return lambda: self.sample(logits(), samplers)
        draws = self.draws(samplers)
        step = self._plan(work)
        step.logit_rows = last_rows(work)
        picks = self._submit(step, draws).result
        count_cached(work)
        return lambda: self._accept(samplers, picks())

    def start_scored(self, work: list[tuple[Sequence, int]], samplers: list[Sampler | None], scored: list[range],
                     n_tops: list[int | None]) -> Callable[[], tuple[list, list[list[tuple]]]]:
        """`start_sampled`'s pass in one process, each item's rows `scored` names (0 its first new
        token) also scored against the tokens they predict, which its sequence holds already:
        returns a function that waits for (the picks, for each item its rows' (token, logprob,
        top n_top) as plain sampling reports a token's). The pass brings back the rows' residual
        stream, not their logits; the output head takes max_logit_rows of them at a time, so a
        whole prompt chunk is scored within the logits' planned memory."""
        starts = np.cumsum([0] + [n for _, n in work[:-1]], dtype=np.int64)
        last = last_rows(work)
        wanted = [int(start) + j for start, rows in zip(starts, scored) for j in rows]
        targets = [seq.token_ids[seq.num_cached + j + 1] for (seq, _), rows in zip(work, scored) for j in rows]
        logit_rows = np.unique(np.concatenate([last, np.asarray(wanted, np.int64)]))
        index = {int(r): i for i, r in enumerate(logit_rows)}
        residual = self.start_forward(work, device=True, rows=logit_rows, head=False)
        tops = [n for rows, n in zip(scored, n_tops) for _ in rows]

        def wait() -> tuple[list, list[list[tuple]]]:
            x = residual()

            def logits(rows: list[int]):
                return self.model.head(self.ops.take_rows(x, [index[r] for r in rows]))

            picks = self.sample(logits([int(r) for r in last]), samplers)
            found = []
            for first in range(0, len(wanted), self.max_logit_rows):
                part = slice(first, first + self.max_logit_rows)
                found += logprob_picks(targets[part], self.ops.token_logprobs(
                    logits(wanted[part]), targets[part], max(tops[part])), tops[part])
            ends = np.cumsum([len(rows) for rows in scored])
            return picks, [found[end - len(rows):end] for rows, end in zip(scored, ends)]

        return wait

    def _draft_layers(self, layers: tuple[int, ...] | None) -> tuple[int, ...] | None:
        """A draft's layers, checked (None where that is every layer)."""
        n = self.config.n_layers
        if layers is not None:
            layers = tuple(layers)
            if not layers or any(not 0 <= i < n for i in layers) or any(a >= b for a, b in zip(layers, layers[1:])):
                raise ValueError(f"layers must be ascending distinct indices in [0, {n}), got {list(layers)}")
            if len(layers) == n:
                layers = None
        return layers

    def _forward(self, layers: tuple[int, ...] | None, before_draft: bool = False, head: bool = True):
        """The model's step, or that of a subset of its layers (a step of its own to a backend
        that captures steps: `graph_key` names the subset). before_draft, when layers stream:
        marked `late_refills`, a step of its own too. head=False: the step that stops before
        the output head (`Transformer.forward`), a step of its own as well."""
        layers = self._draft_layers(layers)
        late = before_draft and self.placement.n_buffers > 0
        if layers is None and not late and head:
            return self.model.forward
        forward = functools.partial(self.model.forward, layers=layers, head=head)
        forward.graph_key = ("layers", layers, late, head)
        if layers is not None:
            forward.layers_run = layers  # a streamed model's ring copies only these (kernels/layer_ring.py)
        forward.late_refills = late
        return forward

    def drafters(self, speculation: Speculation) -> dict[str, tuple[int, ...] | None]:
        """speculation's drafters here (`Speculation.drafters`). A model draft that runs some of
        the layers streamed from disk beside others it skips cannot run (the disk tier stages
        the images in a whole pass's order: kernels/layer_ring.py): "auto" leaves it out, and
        named, it is refused. Draft trees asked for (`on`) are refused where the engine cannot
        verify them (`verifies_trees`)."""
        drafters = speculation.drafters(self.config.n_layers, self.resident_layers)
        # the streamed layers of each ring (a stage's, or this process's), where some are on disk
        rings = [s.streamed for s in self.stages if s.on_disk] if self.stages else \
            [self.placement.streamed] if "disk" in self.placement.tiers else []
        stuck = [name for name, layers in drafters.items() if layers is not None
                 and any(0 < len(set(ring) & set(layers)) < len(ring) for ring in rings)]
        if stuck and speculation.drafter != "auto":
            raise ValueError(f"the {stuck[0]} drafter runs some of the layers streamed from disk and skips others, "
                             "which the disk tier's whole-pass order cannot serve; give host_ram room for the "
                             "streamed layers, or draft with resident layers")
        drafters = {name: layers for name, layers in drafters.items() if name not in stuck}
        if speculation.tree and not self.verifies_trees and any(layers is not None for layers in drafters.values()):
            raise ValueError("draft_tree 'on': this engine does not verify draft trees (they need an unquantized KV "
                             "cache without a sliding pool); use auto or off")
        return drafters

    @property
    def streams(self) -> bool:
        """Whether a pass copies layers over the link (this process's placement streams some,
        or a stage's does)."""
        return bool(self.placement.streamed) or any(s.streamed for s in self.stages)

    def pass_seconds(self, layers: tuple[int, ...] | None = None) -> float:
        """A one-token decode pass through `layers` (every layer if None) and the head, as the
        placement predicts it; through stages that stream, each stage's own placement in turn.
        Without what a pass through stages costs beyond their compute (`pass_overhead_seconds`)."""
        if any(s.placement for s in self.stages):
            return stages_step_seconds(self.stages, 1, self.rates, layers)
        return self.placement.step_seconds(1, self.rates, layers)

    @property
    def pass_overhead_seconds(self) -> float:
        """What a pass through the pipeline's stages costs the driver beyond their compute (the
        runner's hand-offs, and the one-process device chaining a staged pass forgoes),
        measured per runner and backend; 0 without stages."""
        return 0.0 if self.pipeline is None else self.pipeline.PASS_OVERHEAD_SECONDS[self.ops.name]

    @property
    def resident_layers(self) -> tuple[int, ...]:
        """The layers that stay on the device (every layer unless the placement streams some;
        through stages, unless a stage streams them): the draft set that moves no bytes over
        the link."""
        streamed = {i for s in self.stages for i in s.streamed}
        return tuple(i for i, tier in enumerate(self.placement.tiers) if tier == "vram" and i not in streamed)

    def greedy_decode(self, seqs: list[Sequence], steps: int | None = None) -> Iterator[np.ndarray]:
        """Greedy decode of seqs (each with its last token not yet cached), one step per item:
        the step's ids, which the caller appends to the sequences before asking for the next.
        Each step is started before the previous one's ids reach the host, from those ids on
        the device (`ops.greedy_step`), so the GPU does not wait for the host between steps;
        the step in flight when the caller stops is wasted, and its sequences are one cached
        token ahead of their ids: release them, or append the last ids before stopping. With
        `steps`, exactly that many: the last is started after no other, so the sequences are
        as their ids left them when it has been taken. Reserves each step's KV blocks
        (OutOfBlocks when the cache is full)."""
        self.reserve([(s, 1) for s in seqs])
        pending = self.greedy_step(seqs, fed=False)
        for _ in range(steps - 1) if steps is not None else itertools.count():
            self.reserve([(s, 1) for s in seqs])
            ahead = self.greedy_step(seqs, fed=True)
            yield pending()
            pending = ahead
        yield pending()

    def greedy_step(self, seqs: list[Sequence], fed: bool):
        """Start one greedy decode step of seqs (`ops.greedy_step`): their last tokens, or with
        fed the ids the previous greedy_step of the same sequences is computing. Returns a
        function that waits for the step's ids; the sequences count the step's input as cached.
        Their KV blocks must be reserved for it."""
        ids = self.ops.greedy_step(self.model.forward, self._plan([(s, 1) for s in seqs], fed=fed), self.kv.layers, fed)
        for seq in seqs:
            seq.num_cached += 1
        return ids

    def greedy_chain(self, seqs: list[Sequence], k: int, layers: tuple[int, ...] | None = None,
                     runner_up: bool = False) -> list:
        """The k greedy tokens after each of seqs (their last tokens not cached yet) from the
        model's `layers` (all if None): `start_chain`'s, waited for."""
        return self.start_chain(seqs, k, layers, runner_up)[1]()

    def start_chain(self, seqs: list[Sequence], k: int, layers: tuple[int, ...] | None = None,
                    runner_up: bool = False) -> tuple[object, Callable[[], list]]:
        """Start k greedy decode steps of seqs (their last tokens not cached yet) over the
        model's `layers` (all if None), each fed the previous one's ids on the device
        (`ops.greedy_chain`; a greedy draft, or the drafts of several sequences together).
        Returns the ids as the backend holds them ([k, B]; with runner_up [2, k, B], the
        second-best token at each position too: what a later pass may be fed) and a function
        that waits for them once: each sequence's tokens (with runner_up, (tokens, second
        bests)). Their KV is written at the sequences' next k positions (reserved here;
        OutOfBlocks when the cache is full); the sequences are as they were when this returns."""
        if k < 1:
            raise ValueError(f"a greedy chain needs k >= 1 steps, got {k}")
        before = [(len(seq.token_ids), seq.num_cached) for seq in seqs]
        self.reserve([(seq, k) for seq in seqs])
        if self.pipeline is not None:
            return self._pipeline_chain(seqs, k, layers, runner_up, before)

        def steps():  # each planned when the backend takes it: the first starts before the others are built
            for i in range(k):
                yield self._plan([(seq, 1) for seq in seqs], fed=i > 0)
                for seq in seqs:
                    seq.num_cached += 1
                    if i:
                        seq.token_ids.append(0)  # the place of the id this step is fed; the device holds it

        try:
            ids, get = self.ops.greedy_chain(self._forward(layers), steps(), self.kv.layers, runner_up)
        finally:
            for seq, (length, cached) in zip(seqs, before):
                del seq.token_ids[length:]
                seq.num_cached = cached

        @functools.cache
        def tokens() -> list:
            host = get()
            return list(zip(host[0].T.tolist(), host[1].T.tolist())) if runner_up else host.T.tolist()

        return ids, tokens

    def _pipeline_chain(self, seqs: list[Sequence], k: int, layers: tuple[int, ...] | None, runner_up: bool,
                        before: list[tuple[int, int]]) -> tuple[np.ndarray, Callable[[], list]]:
        """`start_chain` through pipeline stages: each step a pass whose last stage takes the
        argmax (a greedy `Draw` a sequence) or, with runner_up, each row's two best (`TOP2`),
        the ids back on the host before the next step is planned (the driver holds no device);
        the ids [k, B] ([2, k, B]) are the feed a verifying pass takes."""
        ids = np.empty((2, k, len(seqs)), np.int64)
        work, layers = [(seq, 1) for seq in seqs], self._draft_layers(layers)
        draws = TOP2 if runner_up else [Draw(GREEDY_DRAW, 0.0)] * len(seqs)
        try:
            for i in range(k):
                step = self._plan(work)
                step.logit_rows = last_rows(work)
                picks = self._submit(step, draws, layers=layers).result()
                ids[:, i] = picks if runner_up else [pick[0] for pick in picks]
                for seq, token in zip(seqs, ids[0, i].tolist()):
                    seq.num_cached += 1
                    seq.token_ids.append(token)
        finally:
            for seq, (length, cached) in zip(seqs, before):
                del seq.token_ids[length:]
                seq.num_cached = cached
        if runner_up:
            return ids, lambda: list(zip(ids[0].T.tolist(), ids[1].T.tolist()))
        return ids[0], lambda: ids[0].T.tolist()

    def _submit(self, step: StepInputs, draws: list[Draw | None] | str | None = None,
                layers: tuple[int, ...] | None = None):
        """A pass through the stages, carrying the KV moves asked for since the last one, which
        each stage makes in its layers before it runs the pass (`move_kv`)."""
        moves, self._kv_moves = tuple(self._kv_moves), []
        return self.pipeline.submit(step, draws, layers=layers, moves=moves)

    @property
    def verifies_trees(self) -> bool:
        """Whether a verifying pass may hold a draft tree's leaf rows (`_plan`'s leaves): the KV
        cache unquantized and without a sliding pool (a leaf's KV is moved to its position
        whole, `move_kv`)."""
        return not self.kv.layout.type.quantized and not self.kv.sliding

    def move_kv(self, seq: Sequence, src: int, dst: int) -> None:
        """Every layer's K and V at seq's position src copied to its position dst (an accepted
        leaf's, from the slot its pass wrote them to: workers/engine/speculation.py). Through
        stages the move goes with the next pass (`_submit`), before which nothing reads either
        slot: the slot src may be freed and given to a sequence that pass writes, but each
        stage moves before it runs the pass."""
        bs, table = self.blocks.block_size, seq.block_table
        move = slot(table, src, bs), slot(table, dst, bs)
        if self.pipeline is not None:
            self._kv_moves.append(move)
        else:
            self.ops.copy_kv(self.kv.layers, *move)

    def _plan(self, work: list[tuple[Sequence, int]], fed: bool = False, decode_rows: bool = False,
              leaves: list[list[tuple[int, int]]] | None = None) -> StepInputs:
        """A step's tokens, positions and AttentionBatch over the sequences' reserved blocks.
        fed: one token per sequence, not in token_ids yet: the i-th sequence's token is -1 - i,
        naming id i of what the step is fed (`Backend.run_step`'s feed: the previous step's ids).
        decode_rows: each sequence's n tokens as n rows of a decode step, row j the sequence at
        position num_cached + j with its context up to there, its block tables and ring slot
        in every row (AttentionBatch.step_from says which rows are one sequence's): a verifying
        pass is then the decode step of batch n, which a GPU backend replays from its graph.
        leaves (with decode_rows, one list a work item): (j, token) rows after the item's, each
        `token` at the item's position num_cached + j (1 <= j < n) in place of its own there,
        seeing the item's positions before j (a draft tree's alternatives,
        AttentionBatch.step_rows); the m-th writes its KV at the slot of position
        num_cached + n + m, which must be reserved too (`verifies_trees` must hold)."""
        if leaves is not None and any(leaves):
            if not decode_rows or len(leaves) != len(work):
                raise ValueError("leaf rows come with decode_rows, one list of them a work item")
            if not self.verifies_trees:
                raise ValueError("leaf rows need an unquantized KV cache without a sliding pool, in one process")
        else:
            leaves = None
        # plain Python per sequence: a decode step of 64 sequences is built in ~95 us on the
        # development machine, against 430 us with small NumPy arrays per sequence; the GPU
        # waits for it between steps (unless greedy_decode runs it ahead)
        tokens, positions, slots, starts, ctx = [], [], [], [0], []
        rows: list[Sequence] = []  # the sequence of each row of the batch
        step_from: list[int] = []  # decode_rows: each row's sequence's first position in the step
        step_rows: list[int] = []  # decode_rows: the row of that position
        bs = self.blocks.block_size
        sliding = self.blocks.sliding_blocks > 0
        sliding_slots: list[int] = []
        for i, (seq, n) in enumerate(work):
            end = seq.num_cached + n
            if not ((n == 1 and end == len(seq.token_ids) + 1) if fed else (1 <= n and end <= len(seq.token_ids))):
                raise ValueError(f"cannot advance a sequence of {len(seq.token_ids)} tokens from {seq.num_cached} by {n}"
                                 + (" with the previous step's id" if fed else ""))
            table = seq.block_table
            if len(table) * bs < end:
                raise ValueError(f"KV blocks for {end} tokens are not reserved ({len(table)} blocks of {bs})")
            if n == 1:  # a decode step: no ranges to build
                p = seq.num_cached
                tokens.append(-1 - i if fed else seq.token_ids[p])  # fed: names the previous step's id i
                positions.append(p)
                slots.append(slot(table, p, bs))
                if sliding:
                    sliding_slots.append(slot(seq.sliding_table, p, bs))
            else:
                tokens.extend(seq.token_ids[seq.num_cached:end])
                positions.extend(range(seq.num_cached, end))
                slots.extend(slot(table, p, bs) for p in range(seq.num_cached, end))
                if sliding:
                    sliding_slots.extend(slot(seq.sliding_table, p, bs) for p in range(seq.num_cached, end))
            if decode_rows:
                row0 = len(step_from)
                starts.extend(range(starts[-1] + 1, starts[-1] + n + 1))
                ctx.extend(range(seq.num_cached + 1, end + 1))
                rows.extend([seq] * n)
                step_from.extend([seq.num_cached] * n)
                step_rows.extend([row0] * n)
                for m, (j, token) in enumerate(leaves[i] if leaves else ()):
                    spare = end + m
                    if not 1 <= j < n or len(table) * bs <= spare:
                        raise ValueError(f"a leaf at step position {j} of {n} with KV blocks for "
                                         f"{len(table) * bs} tokens (its slot: position {spare})")
                    tokens.append(token)
                    positions.append(seq.num_cached + j)
                    slots.append(slot(table, spare, bs))
                    starts.append(starts[-1] + 1)
                    ctx.append(seq.num_cached + j + 1)
                    rows.append(seq)
                    step_from.append(seq.num_cached)
                    step_rows.append(row0)
            else:
                starts.append(starts[-1] + n)
                ctx.append(end)
                rows.append(seq)
        width = max(len(seq.block_table) for seq, _ in work)

        def padded(table: list[int]) -> list[int]:
            return table + [-1] * (width - len(table))

        batch = AttentionBatch(
            query_starts=np.asarray(starts, dtype=np.int32), context_lens=np.asarray(ctx, dtype=np.int32),
            block_tables=np.array([padded(seq.block_table) for seq in rows], np.int32),
            slot_mapping=np.asarray(slots, dtype=np.int32),
            recent_slots=np.array([seq.recent_slot for seq in rows], np.int32) if self.kv.recent_slots else None,
            sliding_tables=np.array([padded(seq.sliding_table) for seq in rows], np.int32) if sliding else None,
            sliding_slots=np.asarray(sliding_slots, np.int32) if sliding else None,
            step_from=np.asarray(step_from, np.int32) if decode_rows else None,
            step_rows=np.asarray(step_rows, np.int32) if leaves else None,
        )
        return StepInputs(np.asarray(tokens, dtype=np.int64), np.asarray(positions, dtype=np.int64), batch)

    def sample(self, logits, samplers: list[Sampler | None]) -> list[tuple[int, float | None, list | None] | None]:
        """(token, logprob, top) for each row of logits [B, vocab] as `forward(device=True)`
        returns them, None where the sampler is None (`draw_rows`: on the device where the
        backend can, only the ids leaving it). The grammars' masks are computed first, on the
        host, before anything waits for the logits: on the GPU the forward pass that makes
        them is still running (its launches are asynchronous), so the grammar's work overlaps
        the device's."""
        return self._accept(samplers, draw_rows(self.ops, logits, self.draws(samplers)))

    def draws(self, samplers: list[Sampler | None]) -> list[Draw | None]:
        """Each sampler's next draw (`Sampler.next_draw`, None where the sampler is None), the
        grammars' masks computed together by llguidance's threads."""
        wanted = [i for i, s in enumerate(samplers) if s is not None]
        masks = self._masks([samplers[i].constraint for i in wanted])
        mask_of = dict(zip(wanted, masks)) if masks is not None else {}
        return [None if s is None else s.next_draw(mask_of.get(i)) for i, s in enumerate(samplers)]

    @staticmethod
    def _accept(samplers: list[Sampler | None], picked: list) -> list:
        for sampler, pick in zip(samplers, picked):
            if pick is not None:
                sampler.accept(pick[0])
        return picked

    def _masks(self, constraints: list[Constraint | None]) -> np.ndarray | None:
        """The rows' next-token bitmasks (llguidance's threads), None when no row has a grammar."""
        if all(c is None for c in constraints):
            return None
        return self.grammar_tokenizer.fill_masks(constraints)

    @property
    def grammar_tokenizer(self) -> GrammarTokenizer:
        """The vocabulary as the grammar engine sees it: built once, at the first use (~2 s for
        Qwen's 151k tokens on the development machine), not by every engine; threads that
        ask meanwhile wait for that one build."""
        with self._grammar_lock:
            if self._grammar_tokenizer is None:
                self._grammar_tokenizer = GrammarTokenizer(self.tokenizer, self.config.vocab_size)
            return self._grammar_tokenizer

    def constraint(self, spec: GrammarSpec) -> Constraint:
        """A matcher at the start of spec's grammar (ValueError for one the engine cannot enforce)."""
        return self.grammar_tokenizer.constraint(spec)

    def decodes_ahead(self, params: SamplingParams) -> bool:
        """Whether a row with these params may decode by `greedy_step`: greedy, its argmax read
        on the device from the raw logits, nothing (grammar, bias) changing them first."""
        return (params.greedy and params.id_only and not params.constrained and self.ops.device_sampling
                and self.pipeline is None)

    @staticmethod
    def speculates(params: SamplingParams) -> bool:
        """Whether a request with these params may decode speculatively: nothing changing the
        model's distribution first (no penalties, grammar or bias: a draft is verified against
        the raw distribution; those are not implemented for it). Logprobs come from the pass."""
        return not params.penalized and not params.constrained

    def release(self, seq: Sequence) -> None:
        self.blocks.release(seq)

    def check_prompt(self, prompt_ids: list[int], params: SamplingParams | None = None) -> None:
        """The prompt fits the context window with at least one token to generate and, unless it
        is a default (params.cut_to_context), params.max_tokens: an explicit ask that does not
        fit is refused, as vLLM refuses it, rather than silently cut."""
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        if len(prompt_ids) >= self.max_context:
            raise ContextLengthError(
                f"prompt has {len(prompt_ids)} tokens; the context window is {self.max_context} "
                "and at least one token must be generated")
        bad = [t for t in prompt_ids if not 0 <= t < self.config.vocab_size]
        if bad:
            raise ValueError(f"token ids out of range [0, {self.config.vocab_size}): {bad[:5]}")
        if params is not None and params.prompt_logprobs is not None and self.pipeline is not None:
            raise ValueError("invalid sampling parameter prompt_logprobs: the prompt's logprobs (an echo's) are not "
                             "computed through pipeline stages")
        bad = [t for t, _ in params.logit_bias if t >= self.config.vocab_size] if params is not None else []
        if bad:
            raise ValueError(f"invalid sampling parameter logit_bias: token ids out of range "
                             f"[0, {self.config.vocab_size}): {bad[:5]}")
        room = self.max_context - len(prompt_ids)
        if params is not None and not params.cut_to_context and params.max_tokens > room:
            raise ContextLengthError(
                f"max_tokens={params.max_tokens} does not fit: the prompt has {len(prompt_ids)} tokens and the "
                f"context window is {self.max_context}, which leaves room for {room}", param="max_tokens")

    # --- one request -------------------------------------------------------------
    def generate(self, prompt_ids: list[int], params: SamplingParams,
                 speculation: Speculation | None = None) -> Iterator[GeneratedToken]:
        """Stream one completion. The last event carries finish_reason. With speculation, a
        completion without penalties decodes speculatively (workers/engine/speculation.py):
        greedy, the same tokens (and logprobs); sampled, tokens of the same distribution
        from the request's generator; several a pass, the next pass started before this
        one's tokens are handed out. Its drafter and k are chosen pass by pass when
        speculation says auto (workers/engine/draft_policy.py)."""
        if speculation is not None:
            self.drafters(speculation)  # refuses a drafter the engine does not run before anything starts
        if params.prompt_logprobs is not None:
            raise ValueError("invalid sampling parameter prompt_logprobs: the prompt's logprobs are computed by the "
                             "serving scheduler (workers/engine/scheduler.py), not by generate")
        if speculation is not None and params.constrained:
            # a draft is verified against the raw distribution; masking it is not implemented
            raise ValueError("speculative decoding cannot run with a grammar or a logit_bias")
        c = Completion.start(self, prompt_ids, params)
        timings = self.last_timings = Timings(prompt_tokens=c.prompt_tokens)
        spec_stats = self.last_speculation = SpecStats()
        speculate = speculation is not None and self.speculates(params)
        policy = DraftPolicy.for_engine(self, speculation, params.greedy) if speculate else None
        # greedy with nothing else read from the logits: each step starts on the device from
        # the last one's id (greedy_decode); under speculation, for each run of plain steps
        # the policy has decided (its decisions do not depend on the tokens)
        ahead = self.decodes_ahead(params)
        try:
            t0 = time.perf_counter()
            left = c.prompt_tokens
            # a long prompt in steps the budget's activations hold, each reserved when it runs (a
            # sliding pool gives the blocks behind the window back between them)
            while left > self.max_batch_tokens:
                self.reserve([(c.seq, self.max_batch_tokens)])
                self.start_sampled([(c.seq, self.max_batch_tokens)], [None])()  # nothing drawn: no logits back
                left -= self.max_batch_tokens
            self.reserve([(c.seq, left)])
            picked = self.start_sampled([(c.seq, left)], [c.sampler])()[0]
            timings.prefill_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            steps = self.greedy_decode([c.seq]) if ahead and not speculate else None
            kept: list[tuple] = []  # a speculative pass's (token, logprob, top) not handed out yet
            verifying = None  # the pass started after `kept` (start_verify's), while they are handed out
            plain_next = False  # the policy chose a plain step for when `kept` runs out
            plain_left = 0  # steps of the policy's plain run still to come from `steps`

            def start(choice, after: list[int] = ()):
                # at most the tokens the budget leaves and the rows of logits a step holds
                return start_verify(self, c.seq, choice.cut(self.max_logit_rows - 1),
                                    c.budget - c.generated - len(after), spec_stats, c.sampler, after)

            while True:
                event = c.advance(*picked)
                yield event
                if event.finish_reason is not None:
                    return
                if policy is not None and not kept:
                    if verifying is None and not plain_next:
                        choice = policy.next()
                        verifying = None if choice is None else start(choice)
                    plain_next = False
                    if verifying is not None:
                        kept, d = verifying()
                        policy.update(d.choice.drafter, len(d.proposed), d.accepted, d.leaf_hit)
                        verifying, after = None, [t for t, _, _ in kept]
                        if c.generated + len(kept) < c.budget and not c.stop_ids.intersection(after):
                            # the next pass is drafted and verified while the host hands these out
                            choice = policy.next()
                            plain_next = choice is None
                            verifying = None if plain_next else start(choice, after)
                if kept:
                    picked = kept.pop(0)
                elif steps is not None or (policy is not None and ahead):
                    if steps is None:  # the policy's run of plain steps, decoded ahead of the host
                        plain_left = 1 + policy.plain_steps_ahead()
                        steps = self.greedy_decode([c.seq], plain_left)
                    picked = (int(next(steps)[0]), None, None)
                    if policy is not None:
                        spec_stats.plain_steps += 1
                        plain_left -= 1
                        if not plain_left:
                            steps = None
                else:
                    spec_stats.plain_steps += policy is not None
                    self.reserve([(c.seq, 1)])
                    picked = self.start_sampled([(c.seq, 1)], [c.sampler])()[0]
                timings.decode_tokens += 1
                timings.decode_s = time.perf_counter() - t0
        finally:
            self.release(c.seq)
            if policy is not None:
                policy.finish()

    def score(self, ids: list[int], top: int = 10) -> list[dict]:
        """Teacher forcing: for every position, the top logits predicting the next token and the log-sum-exp."""
        if isinstance(top, bool) or not isinstance(top, int) or not 1 <= top <= self.config.vocab_size:
            raise ValueError(f"top={top!r} must be in [1, {self.config.vocab_size}] (the vocabulary)")
        self.check_prompt(ids[:-1] or ids)
        seq = Sequence(list(ids))
        parts = []
        try:  # in steps of max_batch_tokens, as generate's prompt
            while seq.num_cached < len(ids):
                n = min(self.max_batch_tokens, len(ids) - seq.num_cached)
                self.reserve([(seq, n)])
                parts.append(self.forward([(seq, n)], all_logits=True))
        finally:
            self.release(seq)
        logits = np.concatenate(parts)
        out = []
        for row in logits:
            best = np.argpartition(-row, top - 1)[:top]
            best = best[np.argsort(-row[best], kind="stable")]
            lse = float(row.astype(np.float64).max() - log_softmax(row).max())
            out.append({"top": [[int(i), float(row[i])] for i in best], "lse": lse})
        return out

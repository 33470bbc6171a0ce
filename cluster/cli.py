"""`ntr`: the command line. Every command takes `--model` (a path or a pulled model's name)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from pathlib import Path

from kernels.kv_layout import KV_TYPES
from workers.engine.grammar import MAX_GRAMMAR_CHARS, GrammarSpec
from workers.engine.requant_streamed import TYPES as REQUANT_TYPES
from workers.engine.requant_streamed import check_spec
from workers.engine.sampling import SamplingParams
from workers.model import store as model_store

DEFAULT_MAX_TOKENS = 128  # generate's, cut to the room the prompt leaves


GIB = 2**30
BLOCK_SIZE = 16  # tokens a KV block holds: the engine's and the server config's default, as ntr plan sizes the cache


def _placement_options(args) -> dict:
    """The Engine's placement arguments from --vram-gb, --n-buffers, --ram-gb, --kv-type and
    --requant-streamed."""
    for flag in ("vram_gb", "ram_gb", "n_buffers"):
        value = getattr(args, flag)
        if value is not None and value <= 0:
            raise ValueError(f"--{flag.replace('_', '-')} must be > 0, got {value}")
    return {"vram_budget": None if args.vram_gb is None else int(args.vram_gb * GIB), "n_buffers": args.n_buffers,
            "host_ram": None if args.ram_gb is None else int(args.ram_gb * GIB), "kv_type": args.kv_type,
            "requant_streamed": check_spec(args.requant_streamed)}


def disk_tier(model_path):
    """The in-process disk tier for layers that host RAM cannot hold: their images written to
    `image_path(model_path)`, read back by a thread (a Serve replica uses DiskTier actors,
    workers/node_tiers.py)."""
    from workers.memory.disk_stream import DiskStream, image_path

    return lambda sizes: DiskStream(image_path(model_path), sizes)


def _engine(args, **kwargs):
    from workers.engine.engine import Engine

    path = model_store.resolve(args.model)
    return Engine(path, backend=args.backend, disk_open=disk_tier(path), resident_order=_resident_order(args, path),
                  **_placement_options(args), **kwargs)


def _resident_order(args, path) -> tuple[int, ...] | None:
    """With --skip-set (the commands that take it) under a budget, the skip drafter's layers
    claim residency first, so its drafts copy nothing over the link
    (skip_calibration.residency_order)."""
    from workers.engine.skip_calibration import residency_order

    skip_set = getattr(args, "skip_set", None)
    return residency_order(skip_set, path) if skip_set and args.vram_gb else None


def cmd_plan(args) -> int:
    from dataclasses import replace

    from kernels.cupy.planes import CupySizes
    from workers.engine.pipeline import staged_pass
    from workers.engine.placement import Rates, plan_model
    from workers.model.config import ModelConfig
    from workers.model.gguf_file import GGUFFile

    options = _placement_options(args)
    if options["vram_budget"] is None:
        raise ValueError("--vram-gb is required")
    rates, source = Rates(), {"link_gb_s": "default (PCIe 4 x16); --link-gb-s or a GPU measures it"}
    if args.link_gb_s is not None:
        rates, source["link_gb_s"] = replace(rates, link_gb_s=args.link_gb_s), "--link-gb-s"
    elif args.backend == "cupy":
        try:
            from kernels import get_backend

            link = get_backend("cupy").host_link()
            rates = replace(rates, link_gb_s=link["h2d_gb_s"])
            source["link_gb_s"] = (f"pinned copy on {link['gpu']} (PCIe gen {link['gen']} x{link['width']}), "
                                   f"{'cached' if link['cached'] else 'measured'} {link['measured_at']}")
        except ValueError:
            pass  # no GPU here: the default stands, named as such
    source.update(weight_read_gb_s="default (H200: 70B tg128)", prompt_tflops="default (H200: 70B pp512)",
                  disk_gb_s="default", layer_floor_s="default (H200: the 0.5B's resident step)")
    path = model_store.resolve(args.model)
    with GGUFFile(path) as gguf:
        config = ModelConfig.from_gguf(gguf)
        max_context = min(config.context_length, args.ctx)
        staged = staged_pass(args.pp, config.n_layers)
        p = plan_model(gguf, config, CupySizes, kv_tokens=args.kv_tokens or max_context, max_context=max_context,
                       block_size=BLOCK_SIZE, max_batch_tokens=args.batch_tokens, max_logit_rows=args.seqs, rates=rates,
                       budget=None if staged else options["vram_budget"], host_ram=options["host_ram"],
                       n_buffers=options["n_buffers"], kv_type=options["kv_type"],
                       requant_streamed=options["requant_streamed"], resident_order=_resident_order(args, path))
        stages = _plan_stages(args, options, gguf, config, p, rates) if staged else None
    predicted = p.predict(rates, prompt=args.batch_tokens, batch=args.seqs)
    if stages is not None:
        return _print_stages(args, config, stages, stages.pop("predicted_streaming") or predicted)
    if args.json:
        print(json.dumps({"placement": p.as_dict(), "predicted": predicted,
                          "rates": {k: getattr(rates, k) for k in source}, "rates_source": source}))
        return 0
    sliding = (f" (sliding layers' pool: {min(p.kv_tokens, p.sizes.kv_sliding_tokens)} tokens "
               f"{p.sizes.kv_sliding_bytes(p.kv_tokens) / GIB:.2f} of it)") if p.sizes.kv_sliding_tokens else ""
    print(f"{config.n_layers} layers, budget {p.budget / GIB:.2f} GiB: runtime reserve {p.reserve / GIB:.2f}, "
          f"{'norms/head' if p.embed_on_host else 'embedding/norms/head'} {p.device_fixed / GIB:.2f}, "
          f"KV cache {p.kv_tokens} tokens "
          f"{p.sizes.kv_bytes(p.kv_tokens) / GIB:.2f}{sliding}, {p.n_buffers} slots of {p.slot_bytes / 2**20:.1f} MiB, "
          f"resident layers {p.bytes_in('vram') / GIB:.2f}; planned {p.device_bytes / GIB:.2f} GiB")
    if p.why_buffers:
        print(f"slots: {p.why_buffers}")
    runs, start = [], 0
    for i in range(1, len(p.tiers) + 1):
        if i == len(p.tiers) or p.tiers[i] != p.tiers[start]:
            runs.append(f"layers {start}-{i - 1}: {p.tiers[start]}")
            start = i
    print("; ".join(runs))
    embedding = f" (and the embedding table, {p.sizes.embed_bytes / GIB:.2f} GiB, pinned)" if p.embed_on_host else ""
    print(f"host RAM {p.bytes_in('ram') / GIB:.2f} GiB{embedding}, disk {p.bytes_in('disk') / GIB:.2f} GiB")
    if p.streamed:
        print("streamed bytes per token: " + _streamed_bytes(p.file_streamed_bytes, p.streamed_bytes, p.requant))
    for name in source:
        print(f"rate {name} = {getattr(rates, name)} ({source[name]})")
    print("predicted: " + ", ".join(f"{k} {v:.2f}" for k, v in predicted.items()))
    return 0


def _streamed_bytes(file_bytes: int, nbytes: int, requant: dict) -> str:
    """What a pass streams, at the file's types and, where --requant-streamed retypes it, after."""
    line = f"{file_bytes / GIB:.2f} GiB"
    if requant:
        by_type: dict[str, int] = {}
        for t in requant.values():
            by_type[t] = by_type.get(t, 0) + 1
        line += (f" at the file's types, {nbytes / GIB:.2f} GiB requantized ("
                 + ", ".join(f"{n} matrices to {t}" for t, n in sorted(by_type.items())) + ")")
    return line


def _plan_stages(args, options, gguf, config, p, rates) -> dict:
    """`ntr plan --pp P`: the stages of plan_stages under --vram-gb each, with the KV cache
    asked for (one context by default), the most every stage's device leaves room for where
    they are resident, and the layers each streams where its budget does not hold them
    (requantized where --requant-streamed says)."""
    import functools

    from kernels.cupy.planes import CupySizes
    from workers.engine.kv_cache import sliding_pool
    from workers.engine.pipeline import KVPools, plan_stages, stages_step_seconds
    from workers.engine.placement import CONTEXT_BYTES, requantized, stage_reserve

    layout = CupySizes.kv_layout(config.n_kv_heads, config.head_dim, BLOCK_SIZE, options["kv_type"])
    sliding, _, sliding_cap = sliding_pool(config, BLOCK_SIZE, args.seqs, args.batch_tokens)
    pools = KVPools(layout, args.seqs, sliding, sliding_cap)
    blocks = -(-p.kv_tokens // BLOCK_SIZE)
    budget, reserve, spec = options["vram_budget"], stage_reserve(p), options["requant_streamed"]
    requant = spec and functools.partial(requantized, gguf=gguf, config=config, sizer=CupySizes, spec=spec,
                                         context=CONTEXT_BYTES)

    def plan(grow: bool):
        return plan_stages(str(gguf.path), CupySizes.name, p.sizes, args.pp, pools, blocks, options["kv_type"], budget,
                           reserve, grow, rates, options["n_buffers"], host_ram=options["host_ram"], requant=requant,
                           resident_order=_resident_order(args, gguf.path))

    specs = plan(False)
    streamed = [i for s in specs for i in s.streamed]
    room = plan(True)[0].num_blocks * BLOCK_SIZE if budget is not None and not streamed else None
    predicted = {} if not streamed else {
        name: tokens / stages_step_seconds(specs, tokens, rates)
        for name, tokens in (("prefill_tok_s", args.batch_tokens), ("decode_tok_s", 1),
                             (f"decode_x{args.seqs}_tok_s", args.seqs))}
    return {"kv_tokens": blocks * BLOCK_SIZE, "kv_tokens_room": room, "reserve": reserve, "budget": budget,
            "embed_bytes": p.sizes.embed_bytes, "predicted_streaming": predicted,
            "streamed_bytes": sum(s.placement.streamed_bytes for s in specs if s.placement),
            "file_streamed_bytes": sum(s.placement.file_streamed_bytes for s in specs if s.placement),
            "requant": {n: t for s in specs if s.placement for n, t in s.placement.requant.items()},
            "stages": [{"layers": [s.layers.start, s.layers.stop - 1], "model_and_kv_bytes": s.nbytes,
                        "device_bytes": s.device_bytes, "streamed": list(s.streamed), "on_disk": list(s.on_disk),
                        "embed_on_host": bool(s.placement and s.placement.embed_on_host),
                        "n_buffers": s.n_buffers, "streamed_bytes": s.placement.streamed_bytes if s.placement else 0,
                        "kv_bytes": sum(pools.layer_bytes(i, blocks) for i in s.layers)} for s in specs]}


def _runs(layers: list[int]) -> str:
    """Ascending layer indices as runs: [4, 9, 10, 11] -> "4, 9-11"."""
    runs = []
    for i in layers:
        if runs and runs[-1][1] == i - 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def _print_stages(args, config, stages: dict, predicted: dict) -> int:
    if args.json:
        print(json.dumps({**stages, "predicted": predicted}))
        return 0
    budget = stages["budget"]
    each = f"budget {budget / GIB:.2f} GiB a stage" if budget is not None else "no budget"
    room = f" (every stage has room for {stages['kv_tokens_room']})" if stages["kv_tokens_room"] else ""
    print(f"{config.n_layers} layers in {len(stages['stages'])} stages, {each}: runtime reserve "
          f"{stages['reserve'] / GIB:.2f} GiB each, KV cache {stages['kv_tokens']} tokens{room}")
    last = len(stages["stages"]) - 1
    for k, s in enumerate(stages["stages"]):
        embedding = "embedding (in pinned host memory)" if s["embed_on_host"] else "embedding"
        ends = ", ".join(e for e, on in ((embedding, k == 0), ("output head", k == last)) if on)
        planned = f"; planned {s['device_bytes'] / GIB:.2f} GiB" if s["device_bytes"] is not None else ""
        disk = f", {len(s['on_disk'])} of them from disk" if s["on_disk"] else ""
        streams = (f"; streams {len(s['streamed'])} layers ({_runs(s['streamed'])}){disk} through "
                   f"{s['n_buffers']} slots" if s["streamed"] else "")
        print(f"stage {k}: layers {s['layers'][0]}-{s['layers'][1]}{', ' + ends if ends else ''}{planned} "
              f"(KV {s['kv_bytes'] / GIB:.2f}){streams}")
    if stages["streamed_bytes"]:
        print("streamed bytes per token across the stages: "
              + _streamed_bytes(stages["file_streamed_bytes"], stages["streamed_bytes"], stages["requant"]))
        print("predicted, at least (the stages one after the other, each stage's copies beside its own compute "
              "only, hand-offs not counted): " + ", ".join(f"{k} {v:.2f}" for k, v in predicted.items()))
    else:
        print("predicted, every layer resident, the stages one after the other (their hand-offs not counted): "
              + ", ".join(f"{k} {v:.2f}" for k, v in predicted.items()))
    return 0


def _grammar(args) -> GrammarSpec | None:
    """--json-schema FILE or --grammar FILE (GBNF) as the output's grammar."""
    if args.json_schema and args.grammar:
        raise ValueError("--json-schema and --grammar cannot be used together")
    path = args.json_schema or args.grammar
    if path is None:
        return None
    if os.path.getsize(path) > MAX_GRAMMAR_CHARS * 4:
        raise ValueError(f"{path} is larger than a grammar may be ({MAX_GRAMMAR_CHARS} characters)")
    source = Path(path).read_text(encoding="utf-8")
    return GrammarSpec("json_schema" if args.json_schema else "gbnf", source)


def cmd_generate(args) -> int:
    if args.pp < 1:
        raise ValueError(f"--pp must be >= 1, got {args.pp}")
    if args.pp == 1:
        return _generate(args, _engine(args))
    # the stages as Ray actors (workers/stage_worker.py) on a local Ray of a CPU per stage
    import functools

    import ray

    from workers.stage_worker import RayPipeline

    ray.init(address="local", num_cpus=args.pp, include_dashboard=False, log_to_driver=False)
    try:
        gpus = stage_gpu_share(args.backend, args.pp, ray.cluster_resources().get("GPU", 0.0))
        stages = functools.partial(RayPipeline, num_gpus=gpus)
        return _generate(args, _engine(args, pipeline_parallel_size=args.pp, stage_runner=stages))
    finally:
        ray.shutdown()


def stage_gpu_share(backend: str, stages: int, gpus: float) -> float:
    """The GPU each of `stages` stage actors reserves on a Ray that sees `gpus`: none on the
    CPU backend; on the GPU a whole one each where there are enough, else 1/n of one, n the
    stages a GPU must hold, so that the shares pack onto the GPUs there are (stages sharing a
    GPU time-slice it)."""
    if backend != "cupy":
        return 0.0
    if int(gpus) < 1:
        raise ValueError(f"--pp {stages} with --backend cupy: the stages need a GPU, and Ray sees none")
    return 1.0 / -(-stages // int(gpus))


def _generate(args, engine) -> int:
    if args.chat:
        prompt_ids = engine.chat_prompt_ids([{"role": "user", "content": args.prompt}])
    else:
        prompt_ids = engine.prompt_ids(args.prompt)
    overrides = {k: v for k, v in dict(
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p, seed=args.seed,
        repetition_penalty=args.repetition_penalty, frequency_penalty=args.frequency_penalty,
        presence_penalty=args.presence_penalty).items() if v is not None}
    default = args.max_tokens is None
    params = SamplingParams.preset(args.preset, max_tokens=DEFAULT_MAX_TOKENS if default else args.max_tokens,
                                   cut_to_context=default, stop=tuple(args.stop), grammar=_grammar(args),
                                   **overrides)
    speculation = _speculation(args, engine.config.n_layers)
    text, token_ids, finish = [], [], None
    for event in engine.generate(prompt_ids, params, speculation):
        if event.token_id is not None:
            token_ids.append(event.token_id)
        text.append(event.text)
        finish = event.finish_reason
        if not args.json:
            sys.stdout.write(event.text)
            sys.stdout.flush()
    t, spec = engine.last_timings, engine.last_speculation
    if args.json:
        print(json.dumps({"text": "".join(text), "prompt_ids": prompt_ids, "token_ids": token_ids,
                          "finish_reason": finish, "prefill_tok_s": round(t.prefill_tok_s, 2),
                          "decode_tok_s": round(t.decode_tok_s, 2),
                          **({"tokens_per_pass": round(spec.tokens_per_pass, 3)} if spec.passes else {})},
                         ensure_ascii=False))
    else:
        sys.stdout.write("\n")
        passes = f", {spec.tokens_per_pass:.2f} tokens a verifying pass" if spec.passes else ""
        print(f"[{len(prompt_ids)} prompt tokens at {t.prefill_tok_s:.1f} tok/s, "
              f"{len(token_ids)} generated at {t.decode_tok_s:.1f} tok/s{passes}, finish: {finish}]", file=sys.stderr)
    return 0


def _speculation(args, n_layers: int):
    """--speculate off|auto|K with --drafter/--draft-layers/--skip-set, as a Speculation (None: off)."""
    from workers.engine.skip_calibration import load_skip_set
    from workers.engine.speculation import Speculation

    skip = load_skip_set(args.skip_set, n_layers) if args.skip_set else None
    return Speculation.from_setting(args.speculate, args.drafter, args.draft_layers, skip, args.draft_tree)


def cmd_calibrate_skip(args) -> int:
    from workers.engine.skip_calibration import calibrate, own_continuations, read_prompts, write

    engine = _engine(args)
    if args.prompts:
        ids = own_continuations(engine, read_prompts(args.prompts), args.generate, args.tokens)
        source = {"prompts": args.prompts, "generate": args.generate}
    else:
        ids = engine.prompt_ids(Path(args.text).read_text())[:args.tokens]
        source = {"text": args.text}
    result = calibrate(engine, ids, args.fraction, args.candidates,
                       progress=lambda line: print(line, file=sys.stderr, flush=True))
    write(args.out, result, source)
    print(json.dumps({k: result[k] for k in ("skip", "tokens")} | {"agreement": result["order"][-1]["agreement"]}))
    return 0


def cmd_perplexity(args) -> int:
    from tqdm import tqdm

    from workers.engine.engine import Engine
    from workers.engine.perplexity import chunks_per_pass, perplexity, text_ids
    from workers.model.config import ModelConfig
    from workers.model.gguf_file import GGUFFile

    if args.batch is not None and args.batch < 1:
        raise ValueError(f"--batch must be >= 1, got {args.batch}")
    path = model_store.resolve(args.model)
    with open(args.file, encoding="utf-8") as f:
        text = f.read()
    with GGUFFile(path) as gguf:  # the vocabulary sizes the default batch, which sizes the KV cache
        per_pass = args.batch or chunks_per_pass(args.ctx, ModelConfig.from_gguf(gguf).vocab_size)
    engine = Engine(path, backend=args.backend, max_context=args.ctx, kv_cache_tokens=per_pass * args.ctx,
                    max_batch_tokens=per_pass * args.ctx, max_logit_rows=per_pass * (args.ctx - 1 - args.ctx // 2),
                    disk_open=disk_tier(path), **_placement_options(args))
    ids = text_ids(engine, text)
    with tqdm(total=len(ids) // args.ctx, unit="chunk", desc="perplexity", disable=None, file=sys.stderr) as bar:
        result = perplexity(engine, ids, args.ctx, per_pass, progress=bar.update)
    if args.json:
        print(json.dumps(result.as_dict()))
    else:
        print(f"perplexity {result.ppl:.4f} over {result.scored} scored tokens ({result.chunks} chunks of "
              f"{args.ctx}; {result.tokens} tokens in the text)")
    return 0


def cmd_quantize(args) -> int:
    from workers.engine.quantize_model import quantize_file
    from workers.model.quant_recipe import Q

    qtype = None
    if args.type is not None:
        try:
            qtype = Q[args.type.upper()]
        except KeyError:
            raise ValueError(f"--type: unknown type {args.type!r}") from None
    for flag in ("target_bpw", "target_bytes"):
        value = getattr(args, flag)
        if value is not None and value <= 0:
            raise ValueError(f"--{flag.replace('_', '-')} must be > 0, got {value}")
    report = quantize_file(model_store.resolve(args.model), args.out, qtype=qtype, target_bytes=args.target_bytes,
                           target_bpw=args.target_bpw, imatrix_file=args.imatrix_file, imatrix_out=args.imatrix_out,
                           calibration_file=args.calibration_file, sensitivity_file=args.sensitivities,
                           log=lambda line: print(line, file=sys.stderr, flush=True))
    if not args.types:
        report.pop("types")
    print(json.dumps(report))
    return 0


def cmd_tokenize(args) -> int:
    from workers.model.gguf_file import GGUFFile
    from workers.model.tokenizer import Tokenizer

    gguf = GGUFFile(model_store.resolve(args.model))
    tokenizer = Tokenizer.from_metadata(gguf.metadata, source=str(gguf.path))
    if args.texts_json:
        with open(args.texts_json, encoding="utf-8") as f:
            texts = json.load(f)
        if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
            raise ValueError(f"{args.texts_json} must hold a JSON list of strings")
        result = [tokenizer.encode(t, add_special=args.bos, parse_special=False) for t in texts]
    else:
        result = tokenizer.encode(args.text, add_special=args.bos, parse_special=False)
    print(json.dumps(result) if args.json else " ".join(map(str, result)))
    return 0


def cmd_score(args) -> int:
    ids = [int(x) for x in args.ids.split(",") if x.strip()]
    rows = max(len(ids), 32)  # logits for every position: what the budget keeps room for
    positions = _engine(args, max_batch_tokens=max(rows, 512), max_logit_rows=rows).score(ids, top=args.top)
    if args.json:
        print(json.dumps({"positions": positions}))
    else:
        for i, p in enumerate(positions):
            print(i, ids[i], "lse=%.4f" % p["lse"], " ".join(f"{t}:{v:.3f}" for t, v in p["top"][:5]))
    return 0


def cmd_models(args) -> int:
    if args.action == "pull":
        print(model_store.pull(args.name, log=lambda m: print(m, file=sys.stderr)))
    else:
        present = dict(model_store.installed())
        for name, entry in model_store.REGISTRY.items():
            where = present.get(name)
            print(f"{name}\t{'installed ' + str(where) if where else 'not installed (ntr models pull ' + name + ')'}"
                  f"\t{entry.description}")
    return 0


def cmd_serve(args) -> int:
    from cluster import config

    config.load(args.config)  # every config error, with file and field, before Ray starts
    import ray
    from ray.serve.scripts import cli as serve_cli

    if args.address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=args.address, namespace="serve")  # serve run's namespace; address None: RAY_ADDRESS
    else:
        # A cluster of its own on this machine. Ray's GCS, raylet, agents and workers listen on
        # every interface whatever the node address (Ray 2.60 turns 127.0.0.1 into the routable
        # one); a new local cluster requires Ray's token on every RPC (ray.init turns token auth
        # on unless RAY_AUTH_MODE says otherwise). What Ray lets bind to loopback does: the
        # dashboard here, the HTTP proxy by the config's http_options.host. docs/deploy.md, "Ports".
        ray.init(namespace="serve", dashboard_host="127.0.0.1")
    # SIGTERM (what kill, systemd and a container runtime send) and SIGINT stop it as Ctrl-C
    # does: `serve run` deletes the apps on KeyboardInterrupt. Set after ray.init, whose own
    # SIGTERM handler exits without that; SIGINT too, as a process a shell starts in the
    # background inherits it ignored.
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    serve_cli.main(["run", args.config], standalone_mode=False)  # on the Ray initialized here
    return 0


def _interrupt(signum, frame):
    raise KeyboardInterrupt(signal.Signals(signum).name)


def cmd_batch(args) -> int:
    from cluster.batch import job  # Ray, pydantic and the HTTP protocol: only for this command

    return job.main(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ntr", description="ntransformer: GGUF LLM inference and serving")
    sub = parser.add_subparsers(dest="command", required=True)

    def with_model(p):
        p.add_argument("--model", help=f"GGUF path or pulled model name (default {model_store.DEFAULT_MODEL})")
        p.add_argument("--backend", default="numpy", help="compute backend: numpy or cupy")
        return p

    def with_placement(p):
        p.add_argument("--vram-gb", type=float, help="device memory budget in GiB (everything the process holds "
                       "there); layers that do not fit stream from host memory (cupy)")
        p.add_argument("--n-buffers", type=int, help="VRAM slots streamed layers pass through (default: chosen "
                       "from the link's and the compute's speed)")
        p.add_argument("--ram-gb", type=float, help="host RAM for streamed layers in GiB (with --pp, the stages' "
                       "together); the rest stream from disk")
        p.add_argument("--kv-type", choices=list(KV_TYPES), help="KV cache type: f32 (numpy's default), f16 (cupy's), "
                       "or Hadamard-rotated q8/q4/q3/q2 (RotateKV)")
        p.add_argument("--requant-streamed", metavar="auto|TYPE",
                       help="requantize the streamed layers as they load, so each pass copies fewer bytes: "
                       f"to TYPE ({', '.join(t.name for t in REQUANT_TYPES)}), or auto: the fewest bytes whose "
                       "predicted loss, from measured sensitivities, stays small")
        return p

    g = with_placement(with_model(sub.add_parser("generate", help="generate text, streamed to stdout")))
    g.add_argument("--prompt", required=True)
    g.add_argument("--chat", action="store_true", help="wrap the prompt as a user message in the model's chat template")
    g.add_argument("--preset", default="balanced", help="greedy, balanced or creative; flags below override it")
    g.add_argument("--max-tokens", type=int,
                   help=f"tokens to generate; must fit the context with the prompt (default: {DEFAULT_MAX_TOKENS}, "
                   "or what the context leaves)")
    g.add_argument("--temperature", type=float)
    g.add_argument("--top-k", type=int)
    g.add_argument("--top-p", type=float)
    g.add_argument("--min-p", type=float)
    g.add_argument("--repetition-penalty", type=float)
    g.add_argument("--frequency-penalty", type=float)
    g.add_argument("--presence-penalty", type=float)
    g.add_argument("--seed", type=int)
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--speculate", default="off", metavar="off|auto|K",
                   help="draft K tokens and verify them in one pass; auto: k (and plain steps) chosen per pass "
                   "from the measured acceptance; greedy gives the same tokens, sampling the same distribution")
    g.add_argument("--drafter", default="lookup", choices=["lookup", "early-exit", "skip", "auto"],
                   help="lookup (n-gram match in the context), early-exit (the model's first layers), skip (the "
                   "model less a calibrated set of layers: --skip-set), auto (chosen per pass by acceptance)")
    g.add_argument("--draft-layers", type=int, help="early-exit: layers the drafter runs (default: a quarter)")
    g.add_argument("--draft-tree", default="auto", choices=["auto", "on", "off"],
                   help="greedy early-exit and skip drafts: also verify the drafter's runner-up token at each "
                   "drafted position (a row each); auto: where the measured acceptance says it pays")
    g.add_argument("--json-schema", metavar="FILE", help="constrain the output to JSON valid against this schema")
    g.add_argument("--grammar", metavar="FILE", help="constrain the output to this GBNF grammar (llama.cpp's format)")
    g.add_argument("--skip-set", help="skip: a JSON file written by ntr calibrate-skip; under --vram-gb the layers "
                   "its draft runs are the ones kept resident")
    g.add_argument("--json", action="store_true")
    g.add_argument("--pp", type=int, default=1, metavar="P",
                   help="pipeline stages: the layers split by bytes over P Ray actors on a local Ray (on the GPU "
                   "a GPU each, or a share of one where there are fewer GPUs than stages)")
    g.set_defaults(func=cmd_generate)

    cs = with_placement(with_model(sub.add_parser(
        "calibrate-skip", help="choose the layers the skip drafter passes over, on a calibration text")))
    src = cs.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompts", help="a JSON list of prompts (none from an evaluation set), each read with the "
                     "model's own greedy continuation: what a draft must predict; e.g. "
                     "tools/data/skip_calibration_prompts.json")
    src.add_argument("--text", help="a calibration text read as it is (not an evaluation text)")
    cs.add_argument("--generate", type=int, default=32, help="with --prompts: tokens the model writes after each")
    cs.add_argument("--fraction", type=float, default=0.5, help="share of the layers to skip")
    cs.add_argument("--tokens", type=int, default=256, help="the first N tokens of the text (or of the prompts and "
                    "continuations) are read")
    cs.add_argument("--candidates", type=int, default=6, help="layers rescored a round after the first (0: none, round one's order)")
    cs.add_argument("--out", required=True, help="JSON file for --skip-set")
    cs.set_defaults(func=cmd_calibrate_skip)

    t = with_model(sub.add_parser("tokenize", help="print token ids"))
    src = t.add_mutually_exclusive_group(required=True)
    src.add_argument("--text")
    src.add_argument("--texts-json", help="file holding a JSON list of strings")
    t.add_argument("--bos", action="store_true", help="add BOS/EOS as the model's metadata says")
    t.add_argument("--json", action="store_true")
    t.set_defaults(func=cmd_tokenize)

    s = with_placement(with_model(sub.add_parser("score", help="teacher-force ids and print the logits per position")))
    s.add_argument("--ids", required=True, help="comma-separated token ids")
    s.add_argument("--top", type=int, default=10)
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_score)

    p = with_placement(with_model(sub.add_parser("perplexity", help="perplexity on a text file, as llama.cpp's llama-perplexity")))
    p.add_argument("--file", required=True, help="a UTF-8 text file")
    p.add_argument("--ctx", type=int, default=512, help="tokens per chunk; each chunk is scored on its second half")
    p.add_argument("--batch", type=int, help="chunks per forward pass (default: as many as 1 GiB of logits hold)")
    p.add_argument("--json", action="store_true", help='print {"ppl", "tokens", "chunks", "scored"}')
    p.set_defaults(func=cmd_perplexity)

    qz = with_model(sub.add_parser("quantize", help="requantize a GGUF: one type, or per-matrix types chosen by "
                                   "measured sensitivity under a byte budget"))
    qz.add_argument("--out", required=True, help="the GGUF to write")
    how = qz.add_mutually_exclusive_group(required=True)
    how.add_argument("--type", help="one type for every matrix, as llama.cpp's static recipe (Q4_0 .. Q8_0, Q2_K .. Q6_K)")
    how.add_argument("--target-bpw", type=float, help="bits per weight over all tensors")
    how.add_argument("--target-bytes", type=int, help="the written file's size at most")
    qz.add_argument("--imatrix-file", help="an importance matrix written by --imatrix-out")
    qz.add_argument("--imatrix-out", help="write the importance matrix measured on --calibration-file (.npz)")
    qz.add_argument("--calibration-file", help="UTF-8 text the importance matrix and sensitivities are measured "
                    "on (never an evaluation text)")
    qz.add_argument("--sensitivities", help="JSON cache of the measured sensitivities: read when it matches the "
                    "model and text, else written")
    qz.add_argument("--types", action="store_true", help="list every matrix's type in the JSON printed")
    qz.set_defaults(func=cmd_quantize)

    pl = with_placement(with_model(sub.add_parser("plan", help="where each layer goes under --vram-gb, and the predicted speed")))
    pl.add_argument("--ctx", type=int, default=8192, help="the context the KV cache must hold (default 8192)")
    pl.add_argument("--kv-tokens", type=int, help="KV cache tokens (default: one context)")
    pl.add_argument("--batch-tokens", type=int, default=512, help="tokens a step takes, and the predicted prompt")
    pl.add_argument("--seqs", type=int, default=16, help="sequences decoded at once (rows of logits a step "
                    "returns), for the predicted aggregate")
    pl.add_argument("--link-gb-s", type=float, help="host-to-device GB/s (default: measured with a GPU)")
    pl.add_argument("--skip-set", help="a calibrate-skip file: the layers its draft runs are kept resident, as "
                    "ntr generate --skip-set keeps them")
    pl.add_argument("--pp", type=int, default=1, metavar="P",
                    help="pipeline stages, each a device of its own under --vram-gb: the stages' layers and memory")
    pl.add_argument("--json", action="store_true")
    pl.set_defaults(func=cmd_plan, backend="cupy")

    m = sub.add_parser("models", help="pull or list models")
    m.add_argument("action", choices=["pull", "list"])
    m.add_argument("name", nargs="?", default=model_store.DEFAULT_MODEL)
    m.set_defaults(func=cmd_models)

    v = sub.add_parser("serve", help="serve a config (configs/*.yaml) on Ray Serve until interrupted")
    v.add_argument("--config", required=True, help="a Serve config file, e.g. configs/dev-cpu.yaml")
    v.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a new local cluster)")
    v.set_defaults(func=cmd_serve)

    b = sub.add_parser("batch", help="generate for every line of a JSONL file on Ray, resumable after a kill "
                       "(also: python -m cluster.batch; the formats are in cluster/batch/job.py)")
    b.add_argument("--input", required=True, help="JSONL: one OpenAI request body with an \"id\" per line")
    b.add_argument("--output", required=True, help="JSONL results, appended; ids already there are skipped")
    b.add_argument("--config", help="a Serve config file (configs/*.yaml); its first app's args are used")
    b.add_argument("--model", help="override the config's model (a registered name or a GGUF path)")
    b.add_argument("--concurrency", type=int, help="requests in flight (default: the config's max_num_seqs)")
    b.set_defaults(func=cmd_batch)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    log = logging.getLogger("ntransformer")  # what the engine detected and chose (placement, link)
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("ntr: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
    try:
        return args.func(args)
    except (ValueError, LookupError, OSError) as e:  # bad input: one clear line, no traceback
        print(f"ntr: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""Offline batch generation over a JSONL file: every input line exactly once, even across kills.

    ray job submit --working-dir . -- python -m cluster.batch --input prompts.jsonl --output out.jsonl \\
        [--config configs/dev-cpu.yaml] [--model NAME_OR_PATH] [--concurrency N]

Each input line is an OpenAI request body plus an "id": {"id": 7, "prompt": "..."} for a
completion or {"id": 7, "messages": [...]} for a chat, with any sampling fields
(max_tokens, temperature, seed, stop, echo, ...; not n, stream or logprobs). A line without an id gets its 1-based line
number (so does a line that is not a JSON object at all). Each output line is {"id", "text",
"finish_reason", "usage"}, or {"id", "error"} for a line that cannot be generated (not a
JSON object, bad fields, prompt past the context): one bad line does not stop the others.

The prompts go to a ComputeWorker through the same client as the Serve replica, so they
share its continuous batching (`--concurrency` requests in flight, default the config's
max_num_seqs). Exactly once: a result is written as one whole line, flushed and fsynced,
in the driver alone, which holds a lock on the output; a restarted job skips the ids already
in the output after cutting off a torn last line that a kill mid-write may have left. Only
a line's own fault (bad fields, prompt past the context) is written as an error; any other
failure fails the job, and the rerun retries the line.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import sys
import time
from pathlib import Path

from cluster import config as config_file
from cluster import openai_protocol as oai
from cluster.config import ServerConfig
from cluster.engine_client import EngineClient
from cluster.errors import APIError


def read_inputs(path: Path) -> list[tuple[object, dict | str]]:
    """(id, request body) per line, or (line number, why the line is not a request body)."""
    inputs, seen = [], set()
    with open(path, "rb") as f:  # bytes: a line that is not UTF-8 is that line's error
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                body = oai.json_body(line)
                if not isinstance(body, dict):
                    raise APIError(400, "expected a JSON object")
                key = body.pop("id", number)
            except APIError as e:
                key, body = number, f"line {number}: {e.message}"
            if json.dumps(key) in seen:
                raise ValueError(f"{path}:{number}: id {key!r} appears twice")
            seen.add(json.dumps(key))
            inputs.append((key, body))
    return inputs


def resume(path: Path) -> set[str]:
    """The ids already written (as JSON text), after cutting off a torn last line."""
    if not path.exists():
        return set()
    data = path.read_bytes()
    whole = data[: data.rfind(b"\n") + 1]
    if len(whole) != len(data):
        with open(path, "r+b") as f:
            f.truncate(len(whole))
    return {json.dumps(json.loads(line)["id"]) for line in whole.decode("utf-8").splitlines() if line.strip()}


async def generate_one(client: EngineClient, model: str, max_context: int, key, body: dict | str) -> dict:
    if isinstance(body, str):  # the line is no request (read_inputs says why)
        return {"id": key, "error": body}
    try:
        chat = "messages" in body
        req = oai.parse_request({**body, "model": model}, chat, model, max_context)
        for name, unsupported in (("n", req.n != 1), ("stream", req.stream), ("logprobs", req.params.logprobs is not None)):
            if unsupported:  # an output line holds one text, whole
                raise APIError(400, f"'{name}' is not supported in a batch job (a result is one text)", param=name)
        ((prompt, params),) = req.choices()
        generation = await client.submit(prompt, params, req.tools)
        choice = oai.Choice(req, 0, await client.prompt_text(prompt) if req.echo else "")
        async for event in generation:
            choice.add(event)
    except Exception as e:
        error = APIError.from_exception(e)
        if error.status not in (400, 404):  # not the line's fault: fail the job, a rerun retries the line
            raise
        return {"id": key, "error": error.message}
    final = choice.final()  # as the HTTP response has it: a chat's tool calls parsed out of its text
    message = final.get("message", {})
    record = {"id": key, "text": final["text"] if "text" in final else message["content"] or "",
              "finish_reason": final["finish_reason"],
              "usage": oai.usage(generation.prompt_tokens, choice.tokens)}  # the tokens the text holds, as HTTP counts
    if message.get("tool_calls"):
        record["tool_calls"] = message["tool_calls"]
    return record


async def run(inputs: list, output: Path, config: ServerConfig, concurrency: int, log=print) -> int:
    with open(output, "a", encoding="utf-8") as out:
        try:  # two jobs appending to one file would break exactly-once
            fcntl.flock(out, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ValueError(f"{output} is being written by another batch job") from None
        done = resume(output)  # appends (O_APPEND) land after a cut-off torn line too
        todo = [(key, body) for key, body in inputs if json.dumps(key) not in done]
        log(f"{len(inputs)} inputs, {len(inputs) - len(todo)} already in {output}, {len(todo)} to generate")
        if not todo:
            return 0
        client = EngineClient(config)
        info = await client.info()
        slots = asyncio.Semaphore(concurrency)
        written, start = 0, time.monotonic()

        async def one(key, body):
            nonlocal written
            async with slots:
                result = await generate_one(client, config.name, info["max_context"], key, body)
            out.write(json.dumps(result, ensure_ascii=False) + "\n")
            out.flush()
            os.fsync(out.fileno())
            written += 1
            log(f"[{len(inputs) - len(todo) + written}/{len(inputs)}] id {key!r} done "
                f"({written / (time.monotonic() - start):.2f} lines/s)")

        await asyncio.gather(*(one(key, body) for key, body in todo))
    return written


def main(args) -> int:
    """`ntr batch` / `python -m cluster.batch` (arguments parsed by cluster.cli)."""
    import ray

    config = config_file.load(args.config)[1][0] if args.config else ServerConfig()
    if args.model:
        config = config.model_copy(update={"model": args.model, "served_model_name": None})
    concurrency = args.concurrency or config.max_num_seqs
    if not 1 <= concurrency <= config.max_num_seqs + config.max_queue:
        raise ValueError(f"--concurrency must be in [1, {config.max_num_seqs + config.max_queue}]")
    inputs, output = read_inputs(Path(args.input)), Path(args.output)
    ray.init(log_to_driver=False)  # joins the job's cluster (RAY_ADDRESS) or starts a local one
    log = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731
    asyncio.run(run(inputs, output, config, concurrency, log))
    log(f"all {len(inputs)} lines are in {output}")
    return 0

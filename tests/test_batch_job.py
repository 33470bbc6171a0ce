"""Batch generation as a Ray job: killed halfway, resubmitted, every input line exactly once."""

from __future__ import annotations

import asyncio
import fcntl
import json
import sys

import pytest
from ray.job_submission import JobStatus, JobSubmissionClient

from cluster.batch.job import generate_one, read_inputs, resume, run
from cluster.config import ServerConfig
from serving_cluster import BIN, REPO, ray_cluster, wait_until

N_PROMPTS = 24


def test_resume_cuts_a_torn_line_and_lists_done_ids(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_text('{"id": 1, "text": "a"}\n{"id": "b", "text": "b"}\n{"id": 3, "te')
    assert resume(out) == {"1", '"b"'}
    assert out.read_text().endswith('"b"}\n')
    assert resume(tmp_path / "missing.jsonl") == set()


def test_inputs_need_unique_ids(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text('{"prompt": "a"}\n\n{"id": 3, "prompt": "b"}\n')
    assert read_inputs(src) == [(1, {"prompt": "a"}), (3, {"prompt": "b"})]
    src.write_text('{"id": 1, "prompt": "a"}\n{"id": 1, "prompt": "b"}\n')
    with pytest.raises(ValueError, match="appears twice"):
        read_inputs(src)


def test_a_bad_line_is_an_error_record_and_the_rest_is_read(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_bytes(b'{"id": "a", "prompt": "x"}\nnot json\n[1, 2]\n' + b"[" * 100_000 + b'\n\xff\n{"prompt": "y"}\n')
    inputs = read_inputs(src)
    assert [key for key, _ in inputs] == ["a", 2, 3, 4, 5, 6]
    assert inputs[0][1] == {"prompt": "x"} and inputs[-1][1] == {"prompt": "y"}
    for key, body in inputs[1:-1]:
        result = asyncio.run(generate_one(None, "m", 4096, key, body))  # refused before any worker call
        assert set(result) == {"id", "error"} and f"line {key}" in result["error"], result


@pytest.mark.parametrize("field", [{"n": 2}, {"stream": True}, {"logprobs": 1}, {"frobnicate": 1}])
def test_a_line_asking_for_what_a_result_cannot_hold_is_an_error_record(field):
    """Refused before anything is submitted (no client is needed), by name."""
    (name,) = field
    record = asyncio.run(generate_one(None, "m", 4096, 7, {"prompt": "a", **field}))
    assert record["id"] == 7 and f"'{name}'" in record["error"]


def test_an_echo_of_max_tokens_0_is_the_prompt_alone_with_no_completion_token():
    """The worker is asked for one token (drawn beside the prompt's last row); the record, as
    the HTTP response, holds the prompt alone."""
    class Generation:
        prompt_tokens, completion_tokens = 2, 1

        async def __aiter__(self):
            yield {"token_id": 1, "text": "!", "finish_reason": "length"}

    class Client:
        async def submit(self, prompt, params, tools):
            assert params.max_tokens == 1
            return Generation()

        async def prompt_text(self, prompt):
            return prompt

    record = asyncio.run(generate_one(Client(), "m", 4096, 4, {"prompt": "Hi", "echo": True, "max_tokens": 0}))
    assert (record["text"], record["finish_reason"]) == ("Hi", "length")
    assert record["usage"] == {"prompt_tokens": 2, "completion_tokens": 0, "total_tokens": 2}


def test_a_chat_line_with_tools_gives_its_calls_parsed():
    """As the HTTP response has them: <tool_call> blocks become tool_calls, the text the rest."""
    events = [("<tool_call>", None), ('\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n', None),
              ("</tool_call>", None), ("", "stop")]

    class Generation:
        prompt_tokens, completion_tokens = 5, len(events)

        async def __aiter__(self):
            for text, finish in events:
                yield {"token_id": 1, "text": text, "finish_reason": finish}

    class Client:
        async def submit(self, prompt, params, tools):
            assert [t["function"]["name"] for t in tools] == ["get_weather"]
            return Generation()

    tool = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
    body = {"messages": [{"role": "user", "content": "Weather in Oslo?"}], "tools": [tool]}
    record = asyncio.run(generate_one(Client(), "m", 4096, 3, body))
    assert record["finish_reason"] == "tool_calls" and record["text"] == ""
    (call,) = record["tool_calls"]
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Oslo"}'}


def test_one_writer_per_output(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_text('{"id": 1, "text": "a"}\n')
    with open(out, "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(ValueError, match="being written by another batch job"):
            asyncio.run(run([(1, {"prompt": "a"})], out, ServerConfig(), 1))
    assert asyncio.run(run([(1, {"prompt": "a"})], out, ServerConfig(), 1, log=lambda m: None)) == 0  # all done


@pytest.mark.real_model
def test_job_killed_halfway_and_resubmitted_writes_every_line_once(real_model_path, tmp_path):
    prompts, out = tmp_path / "prompts.jsonl", tmp_path / "out.jsonl"
    lines = [{"id": f"q{i}", "prompt": f"# {i} squared is", "max_tokens": 6, "temperature": 0, "ignore_eos": True}
             for i in range(N_PROMPTS - 1)]
    lines.append({"id": "chat", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3})
    prompts.write_text("".join(json.dumps(line) + "\n" for line in lines))
    written = lambda: out.read_text().count("\n") if out.exists() else 0  # noqa: E731  (whole lines only)

    with ray_cluster() as cluster:
        jobs = JobSubmissionClient(cluster.dashboard)

        def submit(submission_id: str) -> None:
            cluster.run(str(BIN / "ray"), "job", "submit", "--no-wait",
                        "--address", cluster.dashboard, "--submission-id", submission_id, "--working-dir", str(REPO),
                        "--runtime-env-json", json.dumps({"excludes": [".venv", ".git", "*.gguf", "__pycache__"]}),
                        "--", sys.executable, "-m", "cluster.batch", "--input", str(prompts), "--output", str(out),
                        "--model", str(real_model_path), "--concurrency", "2")

        submit("batch-1")
        wait_until(lambda: written() >= 6 or jobs.get_job_status("batch-1").is_terminal(), 400, "6 results")
        assert jobs.get_job_status("batch-1") == JobStatus.RUNNING, jobs.get_job_logs("batch-1")[-3000:]
        jobs.stop_job("batch-1")
        wait_until(lambda: jobs.get_job_status("batch-1").is_terminal(), 60, "the job to stop")
        first = written()
        assert 6 <= first < N_PROMPTS, "the kill should land halfway"

        submit("batch-2")
        wait_until(lambda: jobs.get_job_status("batch-2").is_terminal(), 400, "the resubmitted job")
        logs = jobs.get_job_logs("batch-2")
        assert jobs.get_job_status("batch-2") == JobStatus.SUCCEEDED, logs[-3000:]
        assert f"{first} already in" in logs

    results = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["id"] for r in results) == sorted(line["id"] for line in lines)  # each id exactly once
    for r in results:
        assert "error" not in r, r
        assert r["finish_reason"] in ("stop", "length") and r["text"]
    assert all(r["usage"]["completion_tokens"] == 6 for r in results if r["id"] != "chat")

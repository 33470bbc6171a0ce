"""The Generation gRPC service through Serve's gRPC ingress, called with the generated stubs;
and the stubs are what tools/gen_proto.sh makes from proto/generation.proto."""

from __future__ import annotations

import os
import subprocess
import sys

import grpc
import pytest

from proto import generation_pb2 as pb
from proto import generation_pb2_grpc as pb_grpc
from serving_cluster import REPO, dev_config, kv_blocks_in_use, ray_cluster, served_app, wait_until

KEY = "grpc-key"
AUTH = (("authorization", f"Bearer {KEY}"),)


def test_stubs_are_up_to_date(tmp_path):
    subprocess.run(["bash", str(REPO / "tools" / "gen_proto.sh"), str(tmp_path)], check=True,
                   env={**os.environ, "PYTHON": sys.executable})
    for name in ("generation_pb2.py", "generation_pb2_grpc.py"):
        assert (tmp_path / "proto" / name).read_text() == (REPO / "proto" / name).read_text(), \
            f"proto/{name} is stale: run tools/gen_proto.sh"


@pytest.fixture(scope="module")
def served(real_model_path, tmp_path_factory):
    """(gRPC stub, HTTP base URL) of one served app."""
    config, http_port, grpc_port = dev_config(tmp_path_factory.mktemp("serve"), real_model_path, api_keys=[KEY])
    with ray_cluster() as cluster, served_app(cluster, config, http_port) as url:
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            yield pb_grpc.GenerationStub(channel), url


@pytest.fixture
def stub(served):
    return served[0]


@pytest.mark.real_model
def test_list_models_and_unary_generate(stub):
    (model,) = stub.ListModels(pb.ListModelsRequest(), metadata=AUTH, timeout=60).models
    assert model.max_context == 4096
    r = stub.Generate(pb.GenerateRequest(model=model.id, prompt="def add(a, b):", max_tokens=4, temperature=0,
                                         ignore_eos=True), metadata=AUTH, timeout=300)
    assert r.finish_reason == "length" and len(r.token_ids) == 4 and r.text
    assert r.usage.completion_tokens == 4 and r.usage.prompt_tokens > 0
    again = stub.Generate(pb.GenerateRequest(prompt="def add(a, b):", max_tokens=4, temperature=0, ignore_eos=True),
                          metadata=(("authorization", f"bearer {KEY}"),), timeout=300)  # RFC 6750: any case
    assert again.text == r.text


@pytest.mark.real_model
def test_streaming_generate_chat(stub):
    request = pb.GenerateRequest(chat=pb.Chat(messages=[pb.ChatMessage(role="user", content="Say hi.")]),
                                 max_tokens=5, temperature=0, stop=["\n"])
    chunks = list(stub.GenerateStream(request, metadata=AUTH, timeout=300))
    assert 1 <= len(chunks) <= 5
    assert all(not c.finish_reason for c in chunks[:-1]) and chunks[-1].finish_reason in ("stop", "length")
    assert chunks[-1].usage.completion_tokens == len(chunks)
    assert "".join(c.text for c in chunks).strip()


@pytest.mark.real_model
@pytest.mark.parametrize("request_, metadata, code", [
    (pb.GenerateRequest(prompt="hi", max_tokens=-1), AUTH, grpc.StatusCode.INVALID_ARGUMENT),
    (pb.GenerateRequest(prompt="hi " * 5000, max_tokens=1), AUTH, grpc.StatusCode.INVALID_ARGUMENT),
    (pb.GenerateRequest(prompt="hi", temperature=9), AUTH, grpc.StatusCode.INVALID_ARGUMENT),
    (pb.GenerateRequest(prompt="hi", max_tokens=10**9), AUTH, grpc.StatusCode.INVALID_ARGUMENT),
    (pb.GenerateRequest(prompt="hi", top_k=-5), AUTH, grpc.StatusCode.INVALID_ARGUMENT),
    (pb.GenerateRequest(prompt="hi"), (("authorization", KEY),), grpc.StatusCode.UNAUTHENTICATED),
    (pb.GenerateRequest(model="nope", prompt="hi"), AUTH, grpc.StatusCode.NOT_FOUND),
    (pb.GenerateRequest(prompt="hi"), (("authorization", "Bearer wrong"),), grpc.StatusCode.UNAUTHENTICATED),
])
def test_errors_carry_status_codes(stub, request_, metadata, code):
    for call in (stub.Generate, lambda *a, **k: list(stub.GenerateStream(*a, **k))):
        with pytest.raises(grpc.RpcError) as e:
            call(request_, metadata=metadata, timeout=60)
        assert e.value.code() == code and e.value.details()


@pytest.mark.real_model
def test_grammar_json_schema_and_logit_bias(stub):
    import json

    import jsonschema

    r = stub.Generate(pb.GenerateRequest(prompt="Is the sky blue? Answer:", max_tokens=5, temperature=0,
                                         grammar='root ::= " yes" | " no"'), metadata=AUTH, timeout=300)
    assert r.text in (" yes", " no") and r.finish_reason == "stop"
    banned = stub.Generate(pb.GenerateRequest(prompt="Is the sky blue? Answer:", max_tokens=5, temperature=0,
                                              grammar='root ::= " yes" | " no"', logit_bias={r.token_ids[0]: -100}),
                           metadata=AUTH, timeout=300)
    assert banned.text in (" yes", " no") and banned.text != r.text
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    j = stub.Generate(pb.GenerateRequest(prompt="JSON:", max_tokens=10, temperature=0, json_schema=json.dumps(schema)),
                      metadata=AUTH, timeout=300)
    assert j.finish_reason == "stop"
    jsonschema.validate(json.loads(j.text), schema)
    with pytest.raises(grpc.RpcError) as e:
        stub.Generate(pb.GenerateRequest(prompt="x", json_schema="{", max_tokens=1), metadata=AUTH, timeout=60)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "json_schema" in e.value.details()


@pytest.mark.real_model
def test_cancelled_stream_frees_its_kv_blocks(served):
    stub, url = served
    call = stub.GenerateStream(pb.GenerateRequest(prompt="Write a long story.", max_tokens=2000, ignore_eos=True),
                               metadata=AUTH, timeout=300)
    assert next(call).token_id >= 0  # tokens are flowing
    assert kv_blocks_in_use(url) > 0
    call.cancel()
    wait_until(lambda: kv_blocks_in_use(url) == 0, 30, "the worker to free the cancelled stream's blocks")

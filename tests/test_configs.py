"""configs/*.yaml load and validate; bad ones fail with the file and the field named."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from cluster import config
from cluster.app import build_app

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_the_three_configs_exist():
    assert {p.stem for p in CONFIGS} >= {"dev-cpu", "gpu-24gb", "gpu-70b-streaming"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_is_valid(path):
    raw, (app,) = config.load(path)
    assert app.max_batch_tokens >= app.max_num_seqs
    assert raw["http_options"]["host"] == "127.0.0.1"  # only k8s/ opens the server to other hosts
    assert raw["grpc_options"]["grpc_servicer_functions"] == [
        "proto.generation_pb2_grpc.add_GenerationServicer_to_server"]
    build_app(raw["applications"][0]["args"])  # what `serve run` calls


def test_dev_cpu_serves_the_default_model_on_loopback():
    raw, (app,) = config.load(CONFIGS[[p.stem for p in CONFIGS].index("dev-cpu")])
    assert (raw["http_options"]["port"], raw["grpc_options"]["port"]) == (8000, 9000)
    assert app.backend == "numpy" and app.num_gpus == 0 and app.name == "qwen2.5-coder-0.5b-instruct-q4_k_m"


def write(tmp_path, text: str) -> Path:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    return path


def app_config(**args) -> str:
    return yaml.safe_dump({"applications": [{"name": "a", "import_path": config.APP_IMPORT_PATH, "args": args}]})


@pytest.mark.parametrize("text, message", [
    (app_config(max_queue=-1), "applications.0.args.max_queue: Input should be greater than or equal to 0"),
    (app_config(backend="tpu"), "applications.0.args.backend: Input should be 'numpy' or 'cupy'"),
    (app_config(backend="cupy"), "backend 'cupy' needs num_gpus: 1"),
    (app_config(max_num_seqs=64, max_batch_tokens=32), "max_batch_tokens (32) must be >= max_num_seqs (64)"),
    (app_config(kv_cache_gb="lots"), "kv_cache_gb: Input should be a valid number"),
    (app_config(step_timeout_s=0), "applications.0.args.step_timeout_s: Input should be greater than 0"),
    (app_config(modle="x"), "applications.0.args.modle: Extra inputs are not permitted"),
    (app_config(speculate=17), "applications.0.args.speculate.constrained-int: Input should be less than or equal to 16"),
    (app_config(speculate="lots"), "applications.0.args.speculate.literal['off','auto']: Input should be 'off' or 'auto'"),
    ("applications: [{name: a, import_path: cluster.app:build_app, args: {speculate: on}}]",
     "speculate must be off, auto or a number of tokens in [1, 16], got true"),
    (app_config(speculate=2, drafter="skip"), "drafter 'skip' needs skip_set"),
    (app_config(speculate="auto", drafter="early-exit", draft_tree="on", kv_type="q4"),
     "draft_tree 'on': a RotateKV cache (kv_type 'q4') does not verify draft trees"),
    ("applications: [{name: a, import_path: other:app}]", "no application with import_path cluster.app:build_app"),
    ("http_options: {port: many}\napplications: []", "http_options.port"),
    ("applications: [", "not valid YAML"),
    ("- just\n- a list", "expected a mapping"),
])
def test_bad_configs_name_the_file_and_field(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(config.ConfigError) as e:
        config.load(path)
    assert str(path) in str(e.value) and message in str(e.value)


def test_speculation_settings_read_as_ntr_generate_reads_its_flags(tmp_path):
    """A bare YAML `off` (YAML 1.1's false) is off; a number or auto reaches the worker's arguments."""
    text = "applications: [{name: a, import_path: cluster.app:build_app, args: {speculate: off}}]"
    (off,) = config.load(write(tmp_path, text))[1]
    assert off.speculate == "off"
    (on,) = config.load(write(tmp_path, app_config(speculate=4, drafter="early-exit", draft_layers=6,
                                                    draft_tree="off")))[1]
    assert {k: on.worker_args()[k] for k in ("speculate", "drafter", "draft_layers", "skip_set", "draft_tree")} == {
        "speculate": 4, "drafter": "early-exit", "draft_layers": 6, "skip_set": None, "draft_tree": "off"}


def test_build_app_rejects_bad_args():
    with pytest.raises(config.ConfigError, match="args.max_context: Input should be greater than or equal to 16"):
        build_app({"max_context": 1})


def test_ntr_serve_reports_config_errors_before_starting_ray(tmp_path, capsys):
    from cluster.cli import main

    assert main(["serve", "--config", str(write(tmp_path, app_config(block_size=0)))]) == 2
    assert "args.block_size: Input should be greater than or equal to 1" in capsys.readouterr().err

"""The service's protocol, limits and configuration without Ray or a server (fast): requests built by the stock
`tritonclient.http` are parsed, responses are read back by its own `InferResult`, bad requests are refused with a
message naming the problem, and the cluster config and the CLI's usage errors are checked before anything starts."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import yaml
from PIL import Image

from serve.model import Limits, read_image
from serve.protocol import (
    HEADER,
    ProtocolError,
    TensorSpec,
    encode_infer_response,
    model_metadata,
    parse_infer_request,
)

th = pytest.importorskip("tritonclient.http")
ROOT = Path(__file__).resolve().parents[1]
INPUTS = [TensorSpec("image", "FP32", (-1, 3, 4, 4))]
OUTPUTS = [TensorSpec("logits", "FP32", (-1, 3)), TensorSpec("features", "FP32", (-1, 2))]
LABELS = ["cat", "dog", "bird"]


def _client_request(x: np.ndarray, *, binary: bool, outputs: list | None = None) -> tuple[bytes, str | None]:
    inp = th.InferInput("image", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=binary)
    body, json_size = th.InferenceServerClient.generate_request_body([inp], outputs=outputs, request_id="r1")
    return body, None if json_size is None else str(json_size)


def _results(batch: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    return {"logits": rng.standard_normal((batch, 3)).astype(np.float32),
            "features": rng.random((batch, 2), dtype=np.float32)}


def _read_back(body: bytes, headers: dict[str, str]) -> th.InferResult:
    length = headers.get(HEADER)
    return th.InferResult.from_response_body(body, header_length=None if length is None else int(length))


@pytest.mark.parametrize("binary", [True, False])
def test_tritonclient_requests_round_trip(binary: bool) -> None:
    x = np.random.default_rng(0).random((2, 3, 4, 4), dtype=np.float32)
    body, length = _client_request(x, binary=binary)
    req = parse_infer_request(body, length, INPUTS, OUTPUTS)
    assert req.id == "r1" and req.batch == 2
    np.testing.assert_array_equal(req.inputs["image"], x)
    # No outputs named: tritonclient asks for every output in binary (binary_data_output).
    assert [(o.name, o.binary) for o in req.outputs] == [("logits", True), ("features", True)]
    results = _results(2)
    body_out, headers = encode_infer_response("m", req, results, LABELS)
    got = _read_back(body_out, headers)
    for name, want in results.items():
        np.testing.assert_array_equal(got.as_numpy(name), want)
    assert got.get_response()["id"] == "r1"


def test_one_output_in_json_and_the_classification_extension() -> None:
    x = np.zeros((2, 3, 4, 4), np.float32)
    body, length = _client_request(x, binary=False, outputs=[th.InferRequestedOutput("logits", binary_data=False)])
    req = parse_infer_request(body, length, INPUTS, OUTPUTS)
    results = _results(2)
    body_out, headers = encode_infer_response("m", req, results, LABELS)
    assert HEADER not in headers and [o["name"] for o in json.loads(body_out)["outputs"]] == ["logits"]
    np.testing.assert_array_equal(_read_back(body_out, headers).as_numpy("logits"), results["logits"])

    body, length = _client_request(x, binary=True, outputs=[th.InferRequestedOutput("logits", class_count=2)])
    req = parse_infer_request(body, length, INPUTS, OUTPUTS)
    top = _read_back(*encode_infer_response("m", req, results, LABELS)).as_numpy("logits")
    assert top.shape == (2, 2)
    for row, logits in zip(top, results["logits"]):
        best = np.argsort(-logits)[:2]
        assert [v.decode().split(":")[1:] for v in row] == [[str(i), LABELS[i]] for i in best]
        assert float(row[0].decode().split(":")[0]) == pytest.approx(float(logits[best[0]]), abs=1e-5)


def _json_request(**tensor: object) -> bytes:
    base = {"name": "image", "shape": [1, 3, 4, 4], "datatype": "FP32", "data": [0.0] * 48}
    return json.dumps({"inputs": [{**base, **tensor}]}).encode()


@pytest.mark.parametrize("body,length,expected", [
    (b"", None, "body is empty"),
    (b"{not json", None, "not valid JSON"),
    (b'{"inputs": []}', None, "needs 'inputs'"),
    (_json_request(name="pixels"), None, "unknown input 'pixels'"),
    (_json_request(datatype="FP64"), None, "datatype 'FP64'; the model takes FP32"),
    (_json_request(shape=[1, 3, 5, 4]), None, "shape [1, 3, 5, 4]; the model takes [-1, 3, 4, 4]"),
    (_json_request(shape=[1, 3, 4]), None, "the model takes [-1, 3, 4, 4]"),
    (_json_request(data=[0.0] * 47), None, "has 47 elements"),
    (_json_request(data=["a"] * 48), None, "must hold numbers"),
    (_json_request(), "99999", "says the JSON header is 99999 bytes"),
    (json.dumps({"inputs": [{"name": "image", "shape": [1, 3, 4, 4], "datatype": "FP32"}],
                 "outputs": [{"name": "maps"}]}).encode(), None, "neither 'data'"),
])
def test_bad_requests_name_the_problem(body: bytes, length: str | None, expected: str) -> None:
    with pytest.raises(ProtocolError) as err:
        parse_infer_request(body, length, INPUTS, OUTPUTS)
    assert expected in str(err.value) and 400 <= err.value.status < 500


def test_binary_body_shorter_or_longer_than_its_header_says() -> None:
    x = np.ones((1, 3, 4, 4), np.float32)
    body, length = _client_request(x, binary=True)
    with pytest.raises(ProtocolError, match="holds 191 bytes of binary data .* binary_data_size says 192"):
        parse_infer_request(body[:-1], length, INPUTS, OUTPUTS)
    with pytest.raises(ProtocolError, match="1 bytes after the binary tensors"):
        parse_infer_request(body + b"\0", length, INPUTS, OUTPUTS)
    assert parse_infer_request(body, length, INPUTS, OUTPUTS).batch == 1  # the same request, intact, is fine


def test_unknown_output_is_refused() -> None:
    body, length = _client_request(np.zeros((1, 3, 4, 4), np.float32), binary=True,
                                   outputs=[th.InferRequestedOutput("saliency")])
    with pytest.raises(ProtocolError, match="unknown output 'saliency'; the model's outputs are"):
        parse_infer_request(body, length, INPUTS, OUTPUTS)


def test_metadata_parameters_are_protocol_values() -> None:
    meta = model_metadata("m", INPUTS, OUTPUTS, {"classes": LABELS, "precision": "fp32", "n_per_class": 5})
    assert meta["inputs"] == [{"name": "image", "datatype": "FP32", "shape": [-1, 3, 4, 4]}]
    assert json.loads(meta["parameters"]["classes"]) == LABELS and meta["parameters"]["n_per_class"] == 5


def _png(size: tuple[int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("L", size).save(buf, format="PNG")
    return buf.getvalue()


def test_image_limits() -> None:
    limits = Limits(max_body_bytes=1 << 20, max_image_pixels=10_000)
    assert read_image(_png((100, 100)), limits).mode == "RGB"
    bomb = _png((5000, 4000))  # a few kB that decode to 20 megapixels
    assert len(bomb) < 50_000
    with pytest.raises(ProtocolError, match="5000 x 4000 = 20,000,000 pixels, over this service's limit") as err:
        read_image(bomb, limits)
    assert err.value.status == 413
    with pytest.raises(ProtocolError, match="not an image"):
        read_image(b"%PDF-1.4 not an image", limits)
    with pytest.raises(ProtocolError, match="body is empty"):
        read_image(b"", limits)


def test_cluster_config_parses_and_its_import_path_builds_the_app(tmp_path: Path) -> None:
    from ray.serve import Application
    from ray.serve.schema import ServeDeploySchema

    from serve import app as app_module

    cfg = yaml.safe_load((ROOT / "serve" / "cluster.yaml").read_text())
    schema = ServeDeploySchema.model_validate(cfg)
    spec = schema.applications[0]
    module, attr = spec.import_path.split(":")
    builder = getattr(__import__(module, fromlist=[attr]), attr)
    assert builder is app_module.build
    assert isinstance(builder({**spec.args, "model": str(tmp_path / "m.onnx")}), Application)
    dep = spec.deployments[0]
    assert dep.name == app_module.DEPLOYMENT and dep.ray_actor_options.num_gpus == 1
    assert dep.max_ongoing_requests >= spec.args["max_batch_size"]
    with pytest.raises(ValueError, match="unknown argument"):
        builder({"model": "m.onnx", "replicas": 2})


def test_cli_usage_errors_come_before_ray_starts(tmp_path: Path) -> None:
    from serve.cli import _deployment_options, _parser

    not_onnx = tmp_path / "m.onnx"
    not_onnx.write_text("hello")
    for argv, expected in [(["--model", str(tmp_path / "none.onnx")], "does not exist"),
                           (["--model", str(not_onnx)], "not a readable ONNX file"),
                           (["--model", str(not_onnx), "--provider", "cuda"], "no CUDA execution provider")]:
        if "CUDA" in expected and "CUDAExecutionProvider" in ort.get_available_providers():
            continue  # this machine can run cuda: nothing to refuse
        done = subprocess.run([sys.executable, "-m", "serve.cli", *argv], capture_output=True, text=True, cwd=ROOT,
                              timeout=120)
        assert done.returncode == 2 and expected in done.stderr, done.stderr
        assert "Started a local Ray instance" not in done.stderr

    def options(*extra: str) -> dict:
        return _deployment_options(_parser().parse_args(["--model", "m.onnx", *extra]))

    assert options()["num_replicas"] == 1 and options()["ray_actor_options"] == {"num_cpus": 1.0, "num_gpus": 0.0}
    assert options("--provider", "cuda")["ray_actor_options"]["num_gpus"] == 1.0
    assert options("--min-replicas", "1", "--max-replicas", "3")["autoscaling_config"]["max_replicas"] == 3
    for bad, expected in [(["--replicas", "2", "--max-replicas", "3"], "exclude each other"),
                          (["--min-replicas", "3", "--max-replicas", "2"], "need 1 <= --min-replicas"),
                          (["--replicas", "0"], "must be >= 1")]:
        with pytest.raises(ValueError, match=expected):
            options(*bad)


def test_haproxy_ingress_gets_its_own_ports_and_files_and_the_proxy_none(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Ray Serve's HAProxy defaults (stats 8404, metrics 9101, files in /tmp/haproxy-serve) would collide between two
    services on one machine: each gets free ports and its own folder; a value the user exported wins."""
    from serve.cli import _ingress_env

    assert _ingress_env("proxy", tmp_path) == {}
    for key in [k for k in os.environ if k.startswith("RAY_SERVE_")]:
        monkeypatch.delenv(key)
    one, two = _ingress_env("haproxy", tmp_path / "a"), _ingress_env("haproxy", tmp_path / "b")
    assert one["RAY_SERVE_ENABLE_HA_PROXY"] == "1"
    ports = {one["RAY_SERVE_HAPROXY_STATS_PORT"], one["RAY_SERVE_HAPROXY_METRICS_PORT"]}
    assert len(ports) == 2 and not ports & {"8404", "9101"}
    files = [k for k in one if k.endswith(("_LOC", "_PATH", "_BASE", "_FILE"))]
    assert len(files) == 4 and all(Path(one[k]).is_relative_to(tmp_path / "a") for k in files)
    assert not {one[k] for k in files} & {two[k] for k in files}
    monkeypatch.setenv("RAY_SERVE_HAPROXY_STATS_PORT", "18404")
    assert _ingress_env("haproxy", tmp_path)["RAY_SERVE_HAPROXY_STATS_PORT"] == "18404"


def test_a_served_session_does_not_spin_and_predicts_does(tmp_path: Path) -> None:
    """The replica's ONNX Runtime threads must not spin-wait (they would take the cores its request handling
    needs); the batch command keeps ONNX Runtime's default."""
    import onnx
    from onnx import TensorProto, helper

    from export.predict import open_session

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    path = tmp_path / "relu.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    key = "session.intra_op.allow_spinning"
    assert open_session(path, "cpu", threads=2, spin=False).get_session_options().get_session_config_entry(key) == "0"
    with pytest.raises(Exception, match="not found|does not exist|config"):  # default: the entry is unset (spin)
        open_session(path, "cpu", threads=2).get_session_options().get_session_config_entry(key)

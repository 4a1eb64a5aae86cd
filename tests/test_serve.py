"""The service as a user runs it: `dinoqpm-serve` (or `python -m serve.cli`) in its own process with its own Ray
instance, started once for this module (the only one that needs it) on a free port, driven by the stock
`tritonclient.http`, plain HTTP and a real browser.

Every output is compared with an in-process ONNX Runtime session on the same input, the image endpoint with
export/predict.py on the same files; every bad input is refused with a 4xx naming the problem and the next good
request is served. The tiny run's export also writes the Triton model repository, checked with Triton's own
configuration proto. The service's start is waited on through /v2/health/ready (a generous hang guard only), and
it must stop cleanly (exit 0) on SIGTERM.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import requests
import tritonclient.http as th
from PIL import Image

from tests._net import free_port
from toolkit.config import load_config

ROOT = Path(__file__).resolve().parents[1]
PREDICT = ROOT / "export" / "predict.py"
# The console script where this environment has it installed (pip install -e .), else the same entry point.
_SCRIPT = Path(sys.executable).parent / "dinoqpm-serve"
SERVE_COMMAND = [str(_SCRIPT)] if _SCRIPT.is_file() else [sys.executable, "-m", "serve.cli"]
START_GUARD_S = 600  # a hang guard, not a speed limit: Ray's start takes ~20 s on 2 busy cores
MAX_BODY_MB, MAX_PIXELS = 1, 500_000
pytestmark = pytest.mark.slow


# ------------------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The tiny run exported (fixed input size) by the CLI together with its Triton model repository, and two real
    photographs (scikit-image's) as files."""
    from skimage import data

    from export.to_onnx import main as export_main
    from toolkit.pipeline import run_pipeline

    tmp = tmp_path_factory.mktemp("serve")
    overrides = [f"cache.root={tmp / 'artifacts'}", f"runtime.output_dir={tmp / 'runs'}", "runtime.progress=false"]
    run_dir = run_pipeline(load_config(ROOT / "configs" / "tiny.yaml", overrides)).run_dir
    model = tmp / "tiny.onnx"
    with contextlib.redirect_stdout(io.StringIO()):
        assert export_main(["--run", str(run_dir), "--out", str(model), "--no-unfolded-report",
                            "--triton-repo", str(tmp / "triton")]) == 0
    images = tmp / "images"
    images.mkdir()
    Image.fromarray(data.chelsea()).save(images / "chelsea.png")
    Image.fromarray(data.astronaut()).save(images / "astronaut.jpg", quality=92)
    return {"tmp": tmp, "run": run_dir, "model": model, "triton": tmp / "triton", "images": images}


@dataclass
class Service:
    url: str
    host: str
    name: str
    proc: subprocess.Popen
    log: Path


@contextlib.contextmanager
def _running(tiny: dict, *extra: str, log_name: str = "serve.log") -> Iterator[Service]:
    """`dinoqpm-serve` on the tiny model, as a user starts it, with small limits so the refusals are cheap to
    trigger, and `extra` arguments. Stopped with SIGTERM on leaving, which must shut Ray down and exit 0 and close
    the port."""
    port = free_port()
    log = tiny["tmp"] / log_name
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    with log.open("w") as out:
        proc = subprocess.Popen([*SERVE_COMMAND, "--model", str(tiny["model"]), "--port", str(port),
                                 "--max-batch-size", "4", "--batch-wait-ms", "20", "--max-body-mb", str(MAX_BODY_MB),
                                 "--max-image-pixels", str(MAX_PIXELS), *extra],
                                stdout=out, stderr=subprocess.STDOUT, cwd=tiny["tmp"], env=env)
    url = f"http://127.0.0.1:{port}"
    guard = time.monotonic() + START_GUARD_S
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"dinoqpm-serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            with contextlib.suppress(requests.ConnectionError):
                if requests.get(f"{url}/v2/health/ready", timeout=10).status_code == 200:
                    break
            if time.monotonic() > guard:
                pytest.fail(f"dinoqpm-serve not ready after {START_GUARD_S} s:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield Service(url, f"127.0.0.1:{port}", "tiny", proc, log)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=180)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert code == 0, log.read_text()[-3000:]
    assert "stopping" in log.read_text()
    with pytest.raises(requests.ConnectionError):  # the ingress went down with its Ray instance
        requests.get(f"{url}/v2/health/live", timeout=10)


@pytest.fixture(scope="module")
def service(tiny: dict) -> Iterator[Service]:
    """The service with its default ingress (Ray Serve's proxy) and one replica."""
    with _running(tiny) as running:
        yield running


@pytest.fixture(scope="module")
def reference(tiny: dict) -> ort.InferenceSession:
    return ort.InferenceSession(str(tiny["model"]), providers=["CPUExecutionProvider"])


def _inputs(n: int, seed: int, session: ort.InferenceSession) -> np.ndarray:
    shape = [n, *session.get_inputs()[0].shape[1:]]
    return np.random.default_rng(seed).random(shape, dtype=np.float32)


def _expected(session: ort.InferenceSession, x: np.ndarray) -> dict[str, np.ndarray]:
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, {"image": x})))


def _infer(client: th.InferenceServerClient, x: np.ndarray, *, binary: bool, outputs: list | None = None,
           name: str = "tiny") -> th.InferResult:
    inp = th.InferInput("image", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=binary)
    return client.infer(name, [inp], outputs=outputs)


# ----------------------------------------------------------------------------------------------------- protocol


def test_health_and_metadata_with_tritonclient(service: Service, tiny: dict, reference: ort.InferenceSession) -> None:
    client = th.InferenceServerClient(service.host)
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("tiny")
    assert not client.is_model_ready("other")
    meta = client.get_model_metadata("tiny")
    size = reference.get_inputs()[0].shape[1:]
    assert meta["inputs"] == [{"name": "image", "datatype": "FP32", "shape": [-1, *size]}]
    assert [(o["name"], o["shape"][0]) for o in meta["outputs"]] == [("logits", -1), ("feature_maps", -1),
                                                                      ("features", -1)]
    onnx_meta = {k.removeprefix("dinoqpm."): json.loads(v)
                 for k, v in reference.get_modelmeta().custom_metadata_map.items() if k.startswith("dinoqpm.")}
    params = meta["parameters"]
    assert json.loads(params["classes"]) == onnx_meta["classes"]
    assert json.loads(params["class_features"]) == onnx_meta["assignment"]
    assert json.loads(params["feature_ids"]) == onnx_meta["feature_ids"]
    server = requests.get(f"{service.url}/v2").json()
    assert server["name"] == "dinoqpm-serve" and "binary_tensor_data" in server["extensions"]


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_infer_equals_in_process_onnxruntime(service: Service, reference: ort.InferenceSession, binary: bool) -> None:
    client = th.InferenceServerClient(service.host)
    x = _inputs(3, seed=int(binary), session=reference)
    want = _expected(reference, x)
    got = _infer(client, x, binary=binary)  # no outputs named: all of them
    for name, value in want.items():
        assert got.as_numpy(name).shape == value.shape
        assert float(np.abs(got.as_numpy(name) - value).max()) <= 1e-5, name
    # Logits alone, in the same mode.
    only = _infer(client, x, binary=binary, outputs=[th.InferRequestedOutput("logits", binary_data=binary)])
    assert [o["name"] for o in only.get_response()["outputs"]] == ["logits"]
    assert float(np.abs(only.as_numpy("logits") - want["logits"]).max()) <= 1e-5
    top = _infer(client, x, binary=binary, outputs=[th.InferRequestedOutput("logits", class_count=2)])
    classes = json.loads(client.get_model_metadata("tiny")["parameters"]["classes"])
    assert [int(v.decode().split(":")[1]) for v in top.as_numpy("logits")[:, 0]] == list(want["logits"].argmax(1))
    assert all(v.decode().split(":")[2] in classes for v in top.as_numpy("logits").reshape(-1))


def test_concurrent_requests_are_batched_and_split_back(service: Service, reference: ort.InferenceSession) -> None:
    xs = [_inputs(1 + i % 3, seed=10 + i, session=reference) for i in range(12)]
    got: dict[int, np.ndarray] = {}
    start = threading.Barrier(len(xs))

    def one(i: int) -> None:
        client = th.InferenceServerClient(service.host)
        start.wait()
        got[i] = _infer(client, xs[i], binary=True).as_numpy("logits")

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(xs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, x in enumerate(xs):
        assert float(np.abs(got[i] - _expected(reference, x)["logits"]).max()) <= 1e-5, i


# ------------------------------------------------------------------------------------------------ image endpoint


def _png_of(data_url: str) -> np.ndarray:
    head, payload = data_url.split(",", 1)
    assert head == "data:image/png;base64"
    with Image.open(io.BytesIO(base64.b64decode(payload))) as im:
        return np.asarray(im.convert("RGB"))


def test_image_endpoint_equals_predict_py(service: Service, tiny: dict, tmp_path: Path) -> None:
    out = tmp_path / "pred"
    proc = subprocess.run([sys.executable, str(PREDICT), "--model", str(tiny["model"]), "--images",
                           str(tiny["images"]), "--out", str(out), "--top-k", "3"], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": ""})
    assert proc.returncode == 0, proc.stderr
    records = json.loads((out / "predictions.json").read_text())["predictions"]
    assert len(records) == 2
    for want in records:
        path = Path(want["image"])
        reply = requests.post(f"{service.url}/explain/tiny", params={"top_k": 3, "maps": "true",
                                                                     "filename": path.name},
                              data=path.read_bytes(), timeout=120)
        assert reply.status_code == 200, reply.text
        got = reply.json()
        assert got["image"] == path.name and got["predicted_name"] == want["predicted_name"]
        assert [t["name"] for t in got["top_k"]] == [t["name"] for t in want["top_k"]]
        for a, b in zip(got["top_k"], want["top_k"]):
            assert abs(a["probability"] - b["probability"]) <= 1e-5 and abs(a["logit"] - b["logit"]) <= 1e-5
        assert [f["feature"] for f in got["features"]] == [f["feature"] for f in want["features"]]
        for a, b in zip(got["features"], want["features"]):
            assert abs(a["contribution"] - b["contribution"]) <= 1e-5 and a["channel"] == b["channel"]
        # The overlay PNG is the one predict.py draws (the header names the file the same way).
        with Image.open(out / want["png"]) as im:
            ref = np.asarray(im.convert("RGB"))
        png = _png_of(got["png"])
        assert png.shape == ref.shape
        assert int(np.abs(png.astype(int) - ref.astype(int)).max()) <= 1
        assert len(got["maps"]) == len(got["features"])
        assert all(_png_of(m["png"]).shape[0] == 224 for m in got["maps"])
    # Without maps: no PNGs; the name a client sends is only shown, never opened.
    reply = requests.post(f"{service.url}/explain/tiny", params={"filename": "/etc/passwd"},
                          data=(tiny["images"] / "chelsea.png").read_bytes(), timeout=120).json()
    chelsea = next(r for r in records if Path(r["image"]).name == "chelsea.png")
    assert reply["image"] == "/etc/passwd" and "png" not in reply and "maps" not in reply
    assert reply["predicted_name"] == chelsea["predicted_name"]


# -------------------------------------------------------------------------------------------------- bad inputs


def _png_bytes(size: tuple[int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("L", size).save(buf, format="PNG")
    return buf.getvalue()


def _binary_request(x: np.ndarray, cut: int) -> tuple[bytes, dict[str, str]]:
    head = json.dumps({"inputs": [{"name": "image", "shape": list(x.shape), "datatype": "FP32",
                                   "parameters": {"binary_data_size": x.nbytes}}]}).encode()
    return head + x.tobytes()[:x.nbytes - cut], {"Inference-Header-Content-Length": str(len(head))}


def _json_tensor(x: np.ndarray, **change: object) -> bytes:
    return json.dumps({"inputs": [{"name": "image", "shape": list(x.shape), "datatype": "FP32",
                                   "data": x.reshape(-1).tolist(), **change}]}).encode()


BAD = {
    # case: ((route, body, headers) from one good input x, expected status, words of the message); route "infer" and
    # "explain" are the tiny model's, others are paths
    "wrong tensor name": (lambda x: ("infer", _json_tensor(x, name="pixels"), {}), 400, "unknown input 'pixels'"),
    "wrong shape": (lambda x: ("infer", _json_tensor(x[:, :, :-1], shape=list(x[:, :, :-1].shape)), {}), 400,
                    "the model takes [-1, 3"),
    "wrong datatype": (lambda x: ("infer", _json_tensor(x, datatype="FP16"), {}), 400,
                       "datatype 'FP16'; the model takes FP32"),
    "binary body shorter than its header says": (lambda x: ("infer", *_binary_request(x, cut=8)), 400,
                                                 "binary_data_size says"),
    "not JSON": (lambda x: ("infer", b"\x00\x01 not json", {}), 400, "not valid JSON"),
    "empty infer body": (lambda x: ("infer", b"", {}), 400, "body is empty"),
    "empty upload": (lambda x: ("explain", b"", {}), 400, "body is empty"),
    "non-image upload": (lambda x: ("explain", b"%PDF-1.7\n" + b"0" * 500, {}), 400, "not an image"),
    "image over the pixel limit": (lambda x: ("explain", _png_bytes((1000, 1000)), {}), 413,
                                   "over this service's limit of 500,000"),
    "body over the size limit": (lambda x: ("infer", b"{" + b" " * (MAX_BODY_MB * 2**20 + 10) + b"}", {}), 413,
                                 "over this service's limit of 1,048,576 bytes"),
    "unknown model": (lambda x: ("/v2/models/other/infer", _json_tensor(x), {}), 404, "unknown model 'other'"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_refused_and_the_next_request_served(case: str, service: Service,
                                                          reference: ort.InferenceSession) -> None:
    make, status, words = BAD[case]
    x = _inputs(1, seed=99, session=reference)
    path, body, headers = make(x)
    url = service.url + {"infer": "/v2/models/tiny/infer", "explain": "/explain/tiny"}.get(path, path)
    reply = requests.post(url, data=body, headers=headers, timeout=120)
    assert reply.status_code == status, reply.text
    assert reply.headers["content-type"].startswith("application/json")
    assert words in reply.json()["error"], reply.json()
    # The service keeps serving: the same client's next, good request succeeds and is right.
    good = _infer(th.InferenceServerClient(service.host), x, binary=True)
    assert float(np.abs(good.as_numpy("logits") - _expected(reference, x)["logits"]).max()) <= 1e-5


# ----------------------------------------------------------------------------------------------------- the page


def test_upload_page_in_a_browser(service: Service, tiny: dict, tmp_path: Path) -> None:
    """A person's path: open the page, choose a photograph, see the prediction and the maps over it."""
    chrome, driver_exe = shutil.which("chromium") or shutil.which("chromium-browser"), shutil.which("chromedriver")
    if not chrome or not driver_exe:
        pytest.fail("no Chromium or chromedriver here: install Debian's `chromium` and `chromium-driver` "
                    "(`apt-get install chromium chromium-driver`, as .ci/run does); the page cannot be checked")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service as DriverService
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    opts = webdriver.ChromeOptions()
    opts.binary_location = chrome
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--window-size=1280,1000",
                f"--user-data-dir={tmp_path / 'profile'}"):
        opts.add_argument(arg)
    browser = webdriver.Chrome(service=DriverService(executable_path=driver_exe), options=opts)
    try:
        browser.get(f"{service.url}/")
        assert "tiny" in browser.title
        status = browser.find_element(By.ID, "status")
        browser.find_element(By.ID, "file").send_keys(str(tiny["images"] / "chelsea.png"))
        WebDriverWait(browser, START_GUARD_S).until(lambda b: status.get_attribute("data-done") == "1"
                                                    or status.get_attribute("data-failed"))
        assert status.get_attribute("data-done") == "1", status.text
        images = browser.execute_script(
            "return Array.from(document.querySelectorAll('#result img')).map("
            "i => ({ok: i.complete && i.naturalWidth > 0, w: i.naturalWidth, h: i.naturalHeight}));")
        assert len(images) == 1 and images[0]["ok"] and images[0]["w"] > 3 * 224, images
        card = browser.find_element(By.ID, "img-0").text
        assert "chelsea.png" in card and "contribution" in card
        shots = Path(os.environ["DINOQPM_SCREENSHOTS"]) if os.environ.get("DINOQPM_SCREENSHOTS") else tmp_path
        shots.mkdir(parents=True, exist_ok=True)
        assert browser.save_screenshot(str(shots / "serve_page.png"))
        with Image.open(shots / "serve_page.png") as im:
            assert len(np.unique(np.asarray(im.convert("RGB")).reshape(-1, 3), axis=0)) > 50  # not a blank page
        # A file that is not an image: the person is told why, and the page still works.
        bad = tmp_path / "notes.png"
        bad.write_text("not really a picture")
        browser.find_element(By.ID, "file").send_keys(str(bad))
        WebDriverWait(browser, START_GUARD_S).until(lambda b: status.get_attribute("data-failed") == "1")
        assert "not an image" in status.text
    finally:
        browser.quit()


# --------------------------------------------------------------------------------------- Triton model repository


def test_triton_repository_parses_with_tritons_model_config(tiny: dict) -> None:
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2  # Triton's own model configuration proto
    folder = tiny["triton"] / "tiny"
    assert (folder / "1" / "model.onnx").read_bytes() == tiny["model"].read_bytes()
    text = (folder / "config.pbtxt").read_text()
    config = text_format.Parse(text, model_config_pb2.ModelConfig())
    session = ort.InferenceSession(str(tiny["model"]), providers=["CPUExecutionProvider"])
    assert config.name == "tiny" and config.platform == "onnxruntime_onnx" and config.max_batch_size > 1
    assert [(i.name, list(i.dims)) for i in config.input] == [("image", session.get_inputs()[0].shape[1:])]
    assert [o.name for o in config.output] == [o.name for o in session.get_outputs()]
    assert all(i.data_type == model_config_pb2.TYPE_FP32 for i in [*config.input, *config.output])
    assert config.output[0].label_filename == "labels.txt"
    assert config.HasField("dynamic_batching") and config.dynamic_batching.max_queue_delay_microseconds > 0
    assert config.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_CPU
    assert config.parameters["intra_op_thread_count"].string_value == "1"
    classes = json.loads(session.get_modelmeta().custom_metadata_map["dinoqpm.classes"])
    assert (folder / "labels.txt").read_text().splitlines() == classes
    # The check can fail: Triton's proto refuses a misspelt field.
    with pytest.raises(text_format.ParseError):
        text_format.Parse(text.replace("max_batch_size", "max_batch_sise"), model_config_pb2.ModelConfig())


# ------------------------------------------------------------------------------------------------ HAProxy ingress


def test_haproxy_ingress_with_two_replicas_gives_the_same_answers(tiny: dict, reference: ort.InferenceSession,
                                                                  service: Service) -> None:
    """`--ingress haproxy` (Ray Serve's HAProxy in front, replicas answering HTTP themselves): the same protocol,
    answers and refusals as the proxy, the main port still bound to --host alone, and a clean stop."""
    import psutil

    with _running(tiny, "--ingress", "haproxy", "--replicas", "2", log_name="serve_haproxy.log") as fast:
        guard = time.monotonic() + START_GUARD_S  # replicas answer before the command prints its lines
        while "ready:" not in (log := fast.log.read_text()) and time.monotonic() < guard:
            time.sleep(0.5)
        assert "ingress: HAProxy" in log and "listen on every interface" in log, log[-3000:]
        port = int(fast.host.rsplit(":", 1)[1])
        listeners = {c.laddr.ip for c in psutil.net_connections("tcp")
                     if c.status == psutil.CONN_LISTEN and c.laddr.port == port}
        assert listeners == {"127.0.0.1"}, listeners
        client = th.InferenceServerClient(fast.host)
        assert client.is_server_ready() and client.is_model_ready("tiny")
        assert client.get_model_metadata("tiny") == th.InferenceServerClient(service.host).get_model_metadata("tiny")
        x = _inputs(5, seed=7, session=reference)
        want = _expected(reference, x)
        for binary in (True, False):
            got = _infer(client, x, binary=binary)
            for name, value in want.items():
                assert float(np.abs(got.as_numpy(name) - value).max()) <= 1e-5, (binary, name)
        for case in ("wrong shape", "body over the size limit", "non-image upload"):
            make, status, words = BAD[case]
            path, body, headers = make(x[:1])
            url = fast.url + {"infer": "/v2/models/tiny/infer", "explain": "/explain/tiny"}[path]
            reply = requests.post(url, data=body, headers=headers, timeout=120)
            assert reply.status_code == status and words in reply.json()["error"], (case, reply.text)
            assert float(np.abs(_infer(client, x, binary=True).as_numpy("logits") - want["logits"]).max()) <= 1e-5

"""imgtrain ui, end to end: the real server (`imgtrain ui` in its own process), driven in Debian's chromium
through Playwright. A test fails on any console error of the page and on any request to another host.
Screenshots of each step go to the test's folder, and to $IMGTRAIN_UI_SCREENSHOTS when set."""

from __future__ import annotations

import http.client
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

import pytest
from PIL import Image

from conftest import make_labelled_folder
from imgtrain.ui.workspace import Workspace

CHROMIUM = next((p for p in ("/usr/lib/chromium/chromium", shutil.which("chromium"), shutil.which("chromium-browser"))
                 if p and os.path.exists(p)), None)
needs_browser = pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed: the page is not "
                                   "tested. Install it with `apt-get install -y chromium` (`.ci/run` does)")
TOKEN = "a-token-for-the-tests-0123456789"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`imgtrain ui` on a free port, with a folder of three classes (and a few traps) it may open."""
    root = tmp_path_factory.mktemp("ui")
    data = root / "data"
    make_labelled_folder(data / "shades", per_class=10)
    lonely = make_labelled_folder(data / "lonely", per_class=3, classes=("dark", "bright"))
    for name in sorted(os.listdir(lonely / "bright"))[1:]:
        (lonely / "bright" / name).unlink()  # class bright: one image
    (data / "notes.zip").write_bytes(b"this is not a zip archive")
    os.symlink("/etc", data / "outside")
    process = subprocess.Popen([sys.executable, "-m", "imgtrain", "ui", "--workspace", str(root / "ws"), "--data",
                                str(data), "--port", "0", "--token", TOKEN], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    line = process.stdout.readline()
    match = re.search(r"(http://\S+)\?token=(\S+)", line)
    assert match, (line, process.stderr.read() if process.poll() is not None else "")
    yield {"url": match.group(1), "token": match.group(2), "root": root, "data": data, "process": process}
    os.killpg(process.pid, signal.SIGTERM)
    process.wait(timeout=30)


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        pytest.skip("Debian's chromium is not installed: the page is not tested. Install it with "
                    "`apt-get install -y chromium` (`.ci/run` does)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=["--use-fake-device-for-media-stream",
                                                                      "--use-fake-ui-for-media-stream"])
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser, server, tmp_path):
    """A page on the server, logged in with the URL's token; failing on console errors and foreign requests."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    problems: list[str] = []
    expected: list[str] = []  # console errors of answers a test provokes on purpose (4xx)
    host = urlparse(server["url"]).netloc
    page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
    page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
    page.on("request", lambda r: problems.append(f"request to another host: {r.url}")
            if urlparse(r.url).netloc not in (host, "") and not r.url.startswith(("data:", "blob:")) else None)
    page.goto(f"{server['url']}?token={server['token']}")
    page.expected_errors = expected
    page.shots = _Shots(tmp_path)
    yield page
    unexpected = [p for p in problems if not (p.startswith("console error: Failed to load resource")
                                             and expected and any(code in p for code in expected))]
    context.close()
    assert not unexpected, unexpected


class _Shots:
    def __init__(self, folder: Path) -> None:
        self.folders = [folder] + ([Path(os.environ["IMGTRAIN_UI_SCREENSHOTS"])]
                                   if os.environ.get("IMGTRAIN_UI_SCREENSHOTS") else [])

    def __call__(self, page, name: str) -> None:
        for folder in self.folders:
            folder.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(folder / f"{name}.png"), full_page=True)


def _wait(page, selector: str, timeout: float = 30_000):
    """page.wait_for_selector, failing with what the page shows: its errors and the run's state."""
    from playwright.sync_api import TimeoutError as Timeout

    try:
        return page.wait_for_selector(selector, timeout=timeout)
    except Timeout:
        errors = [t for t in page.locator(".error").all_inner_texts() if t.strip()]
        raise AssertionError(f"{selector} did not appear; errors on the page: {errors}; run: "
                             f"{page.inner_text('#run-state')!r}; log: {page.inner_text('#run-log')[-1500:]!r}") \
            from None


def _error(page, field: str) -> str:
    spot = page.locator(f'.error[data-for="{field}"]').first
    spot.wait_for(state="visible", timeout=60_000)
    return spot.inner_text()


def _api(server, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
         token: bool = True) -> tuple[int, dict]:
    request = urllib.request.Request(server["url"].rstrip("/") + path, data=body, method=method,
                                     headers={**({"Authorization": f"token {server['token']}"} if token else {}),
                                              **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=120) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@needs_browser
def test_a_person_opens_a_folder_trains_evaluates_tries_and_exports(page, server):
    shots = page.shots
    # 1. Data: the folder picked from the list the page offers; each class a column of thumbnails.
    page.locator("#browse li", has_text=str(server["data"])).click()
    page.locator("#browse li[data-path$='/shades']").click()
    page.click("#open")
    page.wait_for_selector('.class[data-class="bright"] img.thumb')
    assert page.locator(".class h3").all_inner_texts() == ["bright · 10", "dark · 10", "mid · 10"]
    page.wait_for_function("document.querySelector('#dataset-state').textContent.startsWith('Converted')")
    assert "0 file(s) left out" in page.inner_text("#audit-list")
    page.wait_for_function("[...document.querySelectorAll('.class')].every(c => [...c.querySelectorAll('img.thumb')]"
                           ".filter(i => i.complete && i.naturalWidth).length >= 4)")
    shots(page, "1-data")

    # 2. Model and training: resnet18 from scratch, small and short; the curve's points arrive as epochs end.
    page.click("nav button[data-tab=train]")
    page.fill("#model-filter", "resnet")
    page.click("#models tr[data-model=resnet18]")
    page.uncheck("#pretrained")  # no internet here: from scratch
    for field, value in {"epochs": "3", "batch_size": "4", "image_size": "32", "patience": "3",
                         "validation_share": "0.3", "run_name": "first"}.items():
        page.fill(f"#{field}", value)
    page.click("#train")
    _wait(page, "#run-state[data-state=running]")
    _wait(page, "#loss-chart circle.point", timeout=120_000)  # the first epoch's point, while it runs
    _wait(page, "#run-state[data-state=done]", timeout=180_000)
    assert page.locator("#loss-chart circle.point").count() == 3
    assert page.locator("#accuracy-chart circle.point").count() == 3
    shots(page, "2-training")
    trained = server["root"] / "ws" / "runs" / "first" / "trained"
    assert (trained / "metrics.jsonl").is_file()  # an ordinary model directory, which the CLI reads
    from imgtrain import predict

    picture = next((server["data"] / "shades" / "bright").iterdir())
    assert predict(trained, picture)[0].label in ("bright", "dark", "mid")

    # 3. Evaluate: a confusion-matrix cell shows its images.
    page.click("nav button[data-tab=evaluate]")
    page.wait_for_selector("#confusion td")
    assert "Accuracy" in page.inner_text("#evaluate-summary")
    cell = page.locator('#confusion td[data-truth="dark"][data-predicted="dark"]')
    count = int(cell.inner_text())
    cell.click()
    if count:
        page.wait_for_selector("#cell-images img")
    assert page.locator("#cell-images figure").count() == count
    assert page.locator("#per-class tr").count() == 4
    page.wait_for_function("[...document.querySelectorAll('#mistakes img')].filter(i => i.complete && i.naturalWidth)"
                           ".length >= 1")  # imgtrain explain's overlays: the validation share's mistakes first
    shots(page, "3-evaluate")

    # 4. Try it: an upload answered by serve's code, top classes with probabilities.
    page.click("nav button[data-tab=try]")
    page.set_input_files("#predict-file", str(picture))
    page.wait_for_selector("#predictions li")
    labels = page.locator("#predictions li").evaluate_all("items => items.map(i => i.dataset.label)")
    assert sorted(labels) == ["bright", "dark", "mid"]
    shots(page, "4-try")
    # The webcam: Chromium's fake camera, one frame predicted.
    page.click("#webcam")
    page.wait_for_function("document.querySelector('#video').videoWidth > 0")
    page.evaluate("document.querySelector('#predictions').replaceChildren()")
    page.click("#capture")
    page.wait_for_selector("#predictions li")

    # 5. Export: ONNX, downloadable, and the serve command for this model.
    page.click("nav button[data-tab=export]")
    page.click("#export-onnx")
    link = page.wait_for_selector("#downloads a:text('model.onnx')", timeout=120_000)
    with page.expect_download() as download:
        link.click()
    onnx = download.value.path()
    assert Path(onnx).stat().st_size > 1_000_000
    assert f"imgtrain serve {trained}" in page.inner_text("#serve-command")
    shots(page, "5-export")


@needs_browser
def test_a_run_outlives_its_page_and_stop_then_resume_go_on_from_the_checkpoint(browser, page, server):
    body = json.dumps({"path": str(server["data"] / "shades")}).encode()
    status, opened = _api(server, "POST", "/api/datasets", body, {"Content-Type": "application/json"})
    assert status == 200, opened
    page.reload()
    page.wait_for_function("document.querySelector('#dataset-state').textContent.startsWith('Converted')")
    page.click("nav button[data-tab=train]")
    page.uncheck("#pretrained")
    for field, value in {"epochs": "60", "patience": "60", "batch_size": "4", "image_size": "32",
                         "run_name": "long"}.items():
        page.fill(f"#{field}", value)
    page.click("#train")
    _wait(page, "#run-state[data-state=running]")
    page.context.close()  # the page goes; the run does not

    again = browser.new_context().new_page()
    again.goto(f"{server['url']}?token={server['token']}")
    again.click("nav button[data-tab=train]")
    again.select_option("#run-select", "long")
    _wait(again, "#loss-chart circle.point", timeout=120_000)
    again.click("#stop")
    _wait(again, "#run-state[data-state=stopped]", timeout=60_000)
    history = _api(server, "GET", "/api/runs/long")[1]["history"]
    assert 1 <= len(history) < 60
    again.click("#resume")
    again.wait_for_function(f"Number(document.querySelector('#run-state').dataset.epochs) > {len(history)}",
                            timeout=120_000)
    again.click("#stop")
    _wait(again, "#run-state[data-state=stopped]", timeout=60_000)
    resumed = _api(server, "GET", "/api/runs/long")[1]["history"]
    assert [h["epoch"] for h in resumed] == list(range(1, len(resumed) + 1))  # on from the checkpoint, no gap
    assert resumed[:len(history)] == history  # the epochs before the stop, unchanged
    log = _api(server, "GET", "/api/runs/long")[1]["job"]["log"]
    assert "--resume" in log
    again.context.close()


@needs_browser
def test_a_folder_uploaded_from_the_page_becomes_a_data_set(page, server, tmp_path):
    chosen = make_labelled_folder(tmp_path / "pets", per_class=4, classes=("dark", "bright"))
    (chosen / "dark" / "notes.txt").write_text("not an image")
    page.expected_errors.append("415")
    page.set_input_files("#upload-folder", str(chosen))
    page.wait_for_function("document.querySelector('#upload-state').textContent.startsWith('8 of 9 files uploaded')")
    assert "notes.txt is not an image file" in page.inner_text("#upload-state")
    _wait(page, '.class[data-class="bright"] img.thumb')
    assert page.locator(".class h3").all_inner_texts() == ["bright · 4", "dark · 4"]
    page.wait_for_function("document.querySelector('#dataset-state').textContent.startsWith('Converted')")
    uploaded = Path(page.input_value("#path"))
    assert uploaded.parent == server["root"] / "ws" / "uploads" and len(list(uploaded.rglob("*.*"))) == 8


def test_uploads_keep_to_their_folder_and_their_size(server):
    for path, status in [("../../escape.png", 400), ("a/../../b.png", 400), (".hidden/x.png", 400),
                         ("cls/.x.png", 400), ("cls/x\x01.png", 400), ("x.txt", 415), ("", 415),
                         ("deep/er/cls/kept.png", 200)]:
        code, answer = _api(server, "POST", f"/api/uploads?folder=up&path={urllib.request.quote(path)}", b"abc",
                            {"Content-Type": "application/octet-stream"})
        assert code == status, (path, answer)
    assert sorted(p.relative_to(server["root"]) for p in server["root"].rglob("*.png")
                  if "data" not in p.parts and "up" in p.parts) == [Path("ws/uploads/up/cls/kept.png")]
    code, answer = _api(server, "POST", "/api/uploads?folder=../x&path=a/b.png", b"abc")
    assert code == 400 and "not a plain name" in answer["error"]


def test_a_second_folder_can_validate_and_the_split_is_shown(server):
    make_labelled_folder(server["data"] / "held-out", per_class=3, seed=5)
    names = []
    for folder in ("shades", "held-out"):
        status, opened = _api(server, "POST", "/api/datasets", json.dumps({"path": str(server["data"] / folder)})
                              .encode(), {"Content-Type": "application/json"})
        assert status == 200, opened
        names.append(opened["name"])
    deadline = time.monotonic() + 120
    while any(_api(server, "GET", f"/api/datasets/{n}")[1]["job"]["state"] == "running" for n in names):
        assert time.monotonic() < deadline
        time.sleep(0.3)
    status, run = _api(server, "POST", "/api/runs", json.dumps({
        "dataset": names[0], "validation_dataset": names[1], "model_name": "resnet18", "pretrained": False,
        "epochs": 1, "batch_size": 4, "image_size": 32, "name": "held-out-run"}).encode(),
        {"Content-Type": "application/json"})
    assert status == 200, run
    _api(server, "POST", "/api/runs/held-out-run/stop", b"{}", {"Content-Type": "application/json"})
    while _api(server, "GET", "/api/runs/held-out-run")[1]["job"]["state"] == "running":
        assert time.monotonic() < deadline + 60
        time.sleep(0.2)
    assert _api(server, "GET", "/api/runs/held-out-run")[1]["job"]["state"] == "stopped"  # even while starting
    assert run["run"]["split"] == {"training": {"bright": 10, "dark": 10, "mid": 10},
                                   "validation": {"bright": 3, "dark": 3, "mid": 3}}
    assert run["run"]["validation"].endswith("runs/held-out-run/validation")  # its own copy (hard links)
    assert run["run"]["validation_dataset"] == names[1]
    status, answer = _api(server, "POST", "/api/runs", json.dumps({
        "dataset": names[0], "validation_dataset": "../x", "name": "other"}).encode(),
        {"Content-Type": "application/json"})
    assert status == 400 and "not a plain name" in answer["error"], answer


PIPELINE = """type: pipeline
inputs:
  photos: {type: uri_folder, path: shades}
jobs:
  convert:
    component: convert-to-image-directory
    inputs: {source: "${{parent.inputs.photos}}"}
  split:
    component: split-image-directory
    inputs: {source: "${{parent.jobs.convert.outputs.output}}", fraction: 0.8}
"""


@needs_browser
def test_a_pipeline_file_is_drawn_with_each_steps_state_and_a_rerun_runs_only_what_changed(page, server):
    file = server["data"] / "small.yaml"
    file.write_text(PIPELINE)
    page.click("nav button[data-tab=pipelines]")
    page.fill("#pipeline-path", str(file))
    page.click("#pipeline-open")
    _wait(page, '#canvas g[data-step="split"][data-state="will run"]')
    assert page.locator("#canvas path").count() == 2  # photos -> convert, convert.output -> split
    page.click("#pipeline-run")
    _wait(page, '#canvas g[data-step="split"][data-state="ran"]', timeout=120_000)
    assert page.get_attribute('#canvas g[data-step="convert"]', "data-state") == "ran"
    page.click('#canvas g[data-step="split"]')
    _wait(page, '#step-outputs ul[data-port="output_a"] li')
    page.shots(page, "6-pipeline")

    file.write_text(PIPELINE.replace("fraction: 0.8", "fraction: 0.7"))  # split changed, convert did not
    page.select_option("#pipeline-select", "small")
    _wait(page, '#canvas g[data-step="split"][data-state="will run"]')
    assert page.get_attribute('#canvas g[data-step="convert"]', "data-state") == "ran"  # by the last run: cached
    page.click("#pipeline-run")
    _wait(page, '#canvas g[data-step="split"][data-state="ran"]', timeout=120_000)
    assert page.get_attribute('#canvas g[data-step="convert"]', "data-state") == "reused"

    (server["data"] / "no-images").mkdir(exist_ok=True)  # a step that fails: convert finds no image
    file.write_text(PIPELINE.replace("path: shades", "path: no-images"))
    page.expected_errors.append("400")
    page.select_option("#pipeline-select", "small")
    page.click("#pipeline-run")
    _wait(page, '#canvas g[data-step="convert"][data-state="failed"]', timeout=120_000)
    assert page.get_attribute('#canvas g[data-step="split"]', "data-state") == "will run"
    assert _error(page, "pipeline").startswith("InvalidDatasetError: ")

    file.write_text(PIPELINE.replace("fraction: 0.8", "fraction: [0.8"))  # a file that does not read
    page.expected_errors.append("400")
    page.click("#pipeline-open")
    assert _error(page, "pipeline").startswith(f"InvalidPipelineError: {file}:")


@needs_browser
def test_bad_input_through_the_page_is_one_line_next_to_its_control(page, server):
    page.expected_errors += ["400", "403", "404", "409", "413"]
    for path, expected in [("/no/such/folder", "is outside the folders this page may open"),
                           ("../../etc/passwd", "is outside the folders this page may open"),
                           (f"{server['data']}/outside", "is outside the folders this page may open"),
                           (f"{server['data']}/missing", "does not exist")]:
        page.fill("#path", path)
        page.click("#open")
        message = _error(page, "path")
        assert message.startswith("InvalidParameterError: ") and expected in message, message
        page.evaluate("document.querySelector('.error[data-for=path]').textContent = ''")
    # An archive that is not one: Convert to Image Directory's own error, once its job ends.
    page.fill("#path", f"{server['data']}/notes.zip")
    page.click("#open")
    assert "InvalidDatasetError" in _error(page, "path")
    page.screenshot(path=str(page.shots.folders[0] / "bad-archive.png"))

    # A class with one image: the split leaves training or validation without it, named by Train's rules.
    page.fill("#path", f"{server['data']}/lonely")
    page.click("#open")
    page.wait_for_function("document.querySelector('#dataset-state').textContent.startsWith('Converted')")
    assert "Class bright has one image" in page.inner_text("#audit-list")
    page.click("nav button[data-tab=train]")
    page.fill("#batch_size", "2")
    page.fill("#image_size", "16")  # under what ResNet can take
    page.click("#train")
    # The CLI's very line (test_train.py::test_cli_errors_are_one_line runs the command for it)
    assert _error(page, "image_size") == ("NotInRangeValueError: parameter --image-size is 16, allowed: [32, 4,096]. "
                                          "pass an image size from 32 (DenseNet and ResNet shrink images 32-fold) "
                                          "to 4096")
    page.fill("#image_size", "32")
    page.fill("#batch_size", "50")
    page.click("#train")
    assert _error(page, "batch_size").startswith("NotInRangeValueError: parameter --batch-size is 50, allowed: [2, 3]")
    page.fill("#batch_size", "2")
    page.fill("#model_name", "resnet1000")
    page.click("#train")
    assert _error(page, "model_name").startswith("InvalidParameterError: ")
    # A model directory from another program (here: a folder of images), given to Try it's import.
    page.click("nav button[data-tab=try]")
    page.fill("#import-path", str(server["data"] / "shades"))
    page.click("#import")
    assert _error(page, "import").startswith("InvalidModelDirectoryError: ")
    page.screenshot(path=str(page.shots.folders[0] / "bad-parameters.png"))


def test_requests_without_the_token_paths_out_and_bad_uploads_are_refused(server):
    status, answer = _api(server, "GET", "/api/state", token=False)
    assert status == 403 and "token" in answer["error"]
    status, _ = _api(server, "GET", "/api/state", headers={"Authorization": "token wrong"}, token=False)
    assert status == 403
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(server["url"], timeout=30)
    assert refused.value.code == 403
    for path in ("../../etc/passwd", "/etc", str(server["data"] / "outside"), str(server["data"] / "outside/x")):
        status, answer = _api(server, "GET", f"/api/browse?path={urllib.request.quote(path)}")
        assert status == 400 and "outside the folders" in answer["error"], (path, answer)
    for name in ("..", "..%2F..%2Fetc", "a%00b"):
        status, answer = _api(server, "GET", f"/api/runs/{name}")
        assert status in (400, 404), (name, answer)
    status, answer = _api(server, "POST", "/api/datasets", b"[]", {"Content-Type": "text/plain"})
    assert status == 415
    runs = _api(server, "GET", "/api/runs")[1]
    if not any(r["state"] == "done" for r in runs):
        pytest.skip("no trained run: the end-to-end test did not run first")
    name = next(r["name"] for r in runs if r["state"] == "done")
    status, answer = _api(server, "POST", f"/api/runs/{name}/predict", b"%PDF-1.4 not an image",
                          {"Content-Type": "application/octet-stream"})
    assert status == 400 and answer["error"].startswith("the body: ") and answer["field"] == "predict", answer
    # 200 MB announced: refused from its Content-Length, before a byte of it is read.
    address = urlparse(server["url"])
    connection = http.client.HTTPConnection(address.hostname, address.port, timeout=60)
    connection.putrequest("POST", f"/api/runs/{name}/predict")
    for header, value in {"Authorization": f"token {server['token']}", "Content-Type": "image/png",
                          "Content-Length": str(200 * 2**20)}.items():
        connection.putheader(header, value)
    connection.endheaders()
    answer = connection.getresponse()
    assert answer.status == 413 and "over the limit" in json.loads(answer.read())["error"]
    connection.close()
    buffer = io.BytesIO()
    Image.new("RGB", (10, 10)).save(buffer, format="PNG")
    status, answer = _api(server, "POST", f"/api/runs/{name}/predict", buffer.getvalue(), {"Content-Type": "image/png"})
    assert status == 200 and set(answer["probabilities"]) == {"bright", "dark", "mid"}, answer


def test_the_workspace_refuses_names_and_paths_that_lead_out(tmp_path):
    space = Workspace(tmp_path / "ws", [tmp_path])
    (tmp_path / "in").mkdir()
    os.symlink("/", tmp_path / "in" / "root")
    assert space.allowed(str(tmp_path / "in")) == (tmp_path / "in").resolve()
    for path in ("/", str(tmp_path / "in" / "root"), str(tmp_path / "in" / "root" / "etc"), "../..", "\0"):
        with pytest.raises(Exception, match="outside the folders|is empty"):
            space.allowed(path)
    for name in ("..", ".hidden", "a/b", "a\\b", "x" * 65, "", "é"):
        with pytest.raises(Exception, match="not a plain name"):
            space.run_dir(name)
    # An image of an opened folder that is a symbolic link out of it: listed, but never read
    outside = make_labelled_folder(tmp_path.parent / f"{tmp_path.name}-outside", per_class=1, classes=("dark",))
    make_labelled_folder(tmp_path / "in" / "pets", per_class=1, classes=("dark", "bright"))
    os.symlink(next((outside / "dark").iterdir()), tmp_path / "in" / "pets" / "dark" / "linked.png")
    name = space.new_dataset(tmp_path / "in" / "pets")
    listing = space.listing(name)
    linked = listing.images["dark"].index(tmp_path / "in" / "pets" / "dark" / "linked.png")
    with pytest.raises(Exception, match="leads outside the folders"):
        space.image_path(name, listing.classes.index("dark"), linked)
    assert space.image_path(name, listing.classes.index("bright"), 0).is_file()


def test_the_command_line_names_bad_options_and_warns_off_loopback(tmp_path):
    for args, expected in [(["--token", "short"], "error: InvalidParameterError: --token is shorter than 16"),
                           (["--data", str(tmp_path / "missing")], "error: InvalidParameterError: --data "),
                           (["--port", "70000"], "error: NotInRangeValueError: parameter --port is 70000")]:
        r = subprocess.run([sys.executable, "-m", "imgtrain", "ui", "--workspace", str(tmp_path / "ws"), *args],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 1 and r.stderr.startswith(expected) and len(r.stderr.splitlines()) == 1, r.stderr
        assert not (tmp_path / "ws").exists()  # nothing made by a command that failed
    process = subprocess.Popen([sys.executable, "-m", "imgtrain", "ui", "--workspace", str(tmp_path / "ws"), "--host",
                                "0.0.0.0", "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert process.stderr.readline().startswith("warning: listening on 0.0.0.0, not only this machine")
        assert re.match(r"imgtrain ui: open http://0\.0\.0\.0:\d+/\?token=[\w-]{32}$", process.stdout.readline())
    finally:
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=30) == 0


def _post(server, path: str, body: object, **headers) -> tuple[int, dict]:
    return _api(server, "POST", path, json.dumps(body).encode(), {"Content-Type": "application/json", **headers})


def test_what_an_outside_review_found_stays_fixed(server):
    """Each case a hostile reviewer confirmed against the first version of the page."""
    data = server["data"]
    # A folder with an image that is a symbolic link out of the folders the page may open: refused whole.
    outside = make_labelled_folder(server["root"] / "outside-secret", per_class=1, classes=("dark",))
    evil = make_labelled_folder(data / "evil", per_class=2, classes=("dark", "bright"))
    os.symlink(next((outside / "dark").iterdir()), evil / "dark" / "link.png")
    status, answer = _post(server, "/api/datasets", {"path": str(evil)})
    assert status == 400 and "symbolic links out of the folders" in answer["error"] and answer["field"] == "path"
    # A pipeline whose input lies outside the folders the page may open: refused before it is read.
    (data / "leak.yaml").write_text(PIPELINE.replace("path: shades", f"path: {outside}"))
    status, answer = _post(server, "/api/pipelines", {"path": str(data / "leak.yaml")})
    assert status == 400 and "input 'photos'" in answer["error"] and "is outside the folders" in answer["error"]
    # An upload name longer than a file system takes with the temporary suffix
    status, answer = _api(server, "POST", f"/api/uploads?folder=up&path=cls/{'x' * 201}.png", b"abc")
    assert status == 400 and answer["field"] == "path"
    # A '--' in a path names no control; a folder named '_private' opens.
    status, answer = _post(server, "/api/datasets", {"path": "cats--batch-size"})
    assert status == 400 and answer["field"] == "path", answer
    make_labelled_folder(data / "_private", per_class=2, classes=("dark", "bright"))
    status, answer = _post(server, "/api/datasets", {"path": str(data / "_private")})
    assert status == 200 and answer["name"] == "private", answer
    # Numbers the CLI would refuse, refused by name; never a 500.
    for field, value in [("epochs", 1e309), ("epochs", 2.9), ("epochs", True), ("epochs", "1e3"),
                         ("learning_rate", "nan"), ("learning_rate", [1]), ("validation_share", [1]),
                         ("batch_size", {"a": 1}), ("image_size", "-Infinity")]:
        status, answer = _post(server, "/api/runs", {"dataset": "private", field: value})
        assert status == 400 and answer["error"].startswith("InvalidParameterError: --") \
            and answer["field"] == field, (field, value, answer)
        if value == 2.9:
            assert answer["error"] == "InvalidParameterError: --epochs 2.9 is not a whole number"
    # Thumbnails: a negative start is the first page; the token only as the CLI prints it.
    status, page = _api(server, "GET", "/api/datasets/private/images?class=0&start=-5&count=2")
    assert status == 200 and [i["number"] for i in page["images"]] == [0, 1]
    assert _api(server, "GET", "/api/state", headers={"Authorization": server["token"]}, token=False)[0] == 403
    assert _api(server, "GET", "/api/state", headers={"Cookie": "imgtrain-ui-x=wrong"})[0] == 200
    # Two runs' models answer predictions at the same time (the first version stopped one in use).
    runs = {r["name"]: r for r in _api(server, "GET", "/api/runs")[1]}
    if runs.get("first", {}).get("state") != "done":
        pytest.skip("no trained run: the end-to-end test did not run first")
    copy = server["root"] / "ws" / "runs" / "copy"
    shutil.copytree(server["root"] / "ws" / "runs" / "first", copy, ignore=shutil.ignore_patterns("job"))
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 200, 200)).save(buffer, format="PNG")
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda name: _api(server, "POST", f"/api/runs/{name}/predict", buffer.getvalue(),
                                                  {"Content-Type": "image/png"}), ["first", "copy"] * 6))
    assert [status for status, _ in answers] == [200] * 12, answers
    # Resuming a finished run is refused; four Train clicks with one name make one run, and no stray folder.
    status, answer = _post(server, "/api/runs/first/resume", {})
    assert status == 409 and "complete" in answer["error"]
    _converted(server, "private")
    body = {"dataset": "private", "model_name": "resnet18", "pretrained": False, "epochs": 1, "batch_size": 2,
            "image_size": 32, "validation_share": 0.5, "name": "twice"}
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda _: _post(server, "/api/runs", body), range(4)))
    assert sorted(status for status, _ in answers) == [200, 400, 400, 400] or \
        sorted(status for status, _ in answers)[0] == 200 and [s for s, _ in answers].count(200) == 1, answers
    _post(server, "/api/runs/twice/stop", {})
    assert sorted(p.name for p in (server["root"] / "ws" / "runs").iterdir()) == ["copy", "first", "held-out-run",
                                                                                  "long", "twice"]
    deadline = time.monotonic() + 60
    while _api(server, "GET", "/api/runs/twice")[1]["job"]["state"] == "running":
        assert time.monotonic() < deadline
        time.sleep(0.2)


def test_thumbnails_are_made_once_per_content_and_their_urls_change_with_the_listing(tmp_path):
    from imgtrain import convert_to_image_directory

    space = Workspace(tmp_path / "ws", [tmp_path])
    source = make_labelled_folder(tmp_path / "pets", per_class=3, classes=("dark", "bright"))
    (source / "dark" / "000.png").write_bytes(b"not a png")  # convert leaves it out: the numbers shift
    name = space.new_dataset(source)
    before = space.version(name)
    first = space.thumbnail(space.image_path(name, 1, 1))
    convert_to_image_directory(source, space.dataset_dir(name) / "images", log=lambda m: None)
    assert space.listing(name).converted and space.version(name) != before
    copied = space.image_path(name, 1, 0)  # the same file, copied by convert (001.png, now the first)
    assert copied != first and space.thumbnail(copied) == first


def test_the_pages_defaults_are_train_pytorch_models():
    from dataclasses import asdict

    from imgtrain.training.train import TrainingParameters
    from imgtrain.ui.app import DEFAULTS

    assert DEFAULTS == {k: v for k, v in asdict(TrainingParameters()).items() if k in DEFAULTS}


def test_the_page_reads_training_s_work_folder_where_training_writes_it():
    from imgtrain.training.train import resume_dir_for
    from imgtrain.ui.app import RESUME_PREFIX

    assert resume_dir_for(Path("/x/trained")) == Path(f"/x/{RESUME_PREFIX}trained")


def _converted(server, name: str) -> dict:
    deadline = time.monotonic() + 120
    while True:
        data = _api(server, "GET", f"/api/datasets/{name}")[1]
        if data["job"]["state"] != "running" and data["converted"]:
            return data
        assert time.monotonic() < deadline and data["job"]["state"] in ("running", "done", "none"), data
        time.sleep(0.2)


def test_the_audit_shows_what_convert_left_out_and_a_changed_folder_is_converted_again(server):
    folder = make_labelled_folder(server["data"] / "audited", per_class=3, classes=("dark", "bright"))
    (folder / "dark" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    shutil.copy(folder / "dark" / "000.png", folder / "bright" / "same-as-dark.png")  # one picture, two labels
    shutil.copy(folder / "dark" / "001.jpg", folder / "loose.jpg")  # beside the class folders
    status, opened = _post(server, "/api/datasets", {"path": str(folder)})
    assert status == 200, opened
    audit = _converted(server, opened["name"])["audit"]
    assert audit["rejected_count"] == 1 and audit["rejected"][0]["file"].endswith("bad.png")
    assert audit["duplicates_with_different_categories_count"] == 1 and audit["outside_categories"] == 1
    os.rename(folder / "dark" / "002.png", folder / "bright" / "moved.png")  # as many images, one relabelled
    status, opened = _post(server, "/api/datasets", {"path": str(folder)})
    assert status == 200, opened
    counts = {c["name"]: c["count"] for c in _converted(server, opened["name"])["classes"]}
    assert counts == {"bright": 5, "dark": 2}  # the moved image in its new class, the bad one still out


def test_a_trained_model_directory_is_imported_downloaded_and_timed_here(server):
    runs = {r["name"]: r for r in _api(server, "GET", "/api/runs")[1]}
    if runs.get("first", {}).get("state") != "done":
        pytest.skip("no trained run: the end-to-end test did not run first")
    trained = server["root"] / "ws" / "runs" / "first" / "trained"
    status, run = _post(server, "/api/runs/import", {"path": str(trained)})
    assert status == 200 and run["trained"] and run["run"]["imported"] == str(trained), run
    assert {r["name"]: r["state"] for r in _api(server, "GET", "/api/runs")[1]}[run["name"]] == "imported"
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (30, 30, 30)).save(buffer, format="PNG")
    status, answer = _api(server, "POST", f"/api/runs/{run['name']}/predict", buffer.getvalue(),
                          {"Content-Type": "image/png"})
    assert status == 200 and set(answer["probabilities"]) == {"bright", "dark", "mid"}
    status, answer = _post(server, f"/api/runs/{run['name']}/resume", {})
    assert status == 409 and "imported" in answer["error"]
    request = urllib.request.Request(f"{server['url'].rstrip('/')}/api/runs/{run['name']}/download/model.zip",
                                     headers={"Authorization": f"token {server['token']}"})
    with urllib.request.urlopen(request, timeout=60) as answer:
        import zipfile

        names = zipfile.ZipFile(io.BytesIO(answer.read())).namelist()
    assert {f"{run['name']}/model.safetensors", f"{run['name']}/model_spec.yaml"} <= set(names), names
    status, answer = _post(server, "/api/models/resnet18/speed", {})
    assert status == 200 and answer["image_size"] == 224 and answer["images_per_second"] > 0, answer
    row = next(m for m in _api(server, "GET", "/api/models")[1] if m["name"] == "resnet18")
    assert row["speed"] == answer["images_per_second"]
    status, answer = _post(server, "/api/models/resnet1000/speed", {})
    assert status == 400 and answer["field"] == "model_name" and answer["error"].startswith("InvalidParameterError")
    status, answer = _post(server, "/api/models/alexnet/speed", {"image_size": 32})  # torchvision refuses: named
    assert status == 400 and answer["error"].startswith("ImageSizeError: alexnet cannot run at 32 px"), answer


def test_a_jobs_command_outlives_its_runner_killed_and_stop_still_reaches_it(tmp_path, trained_model):
    from imgtrain.ui import jobs

    folder = tmp_path / "job"
    jobs.start(folder, [["serve", str(trained_model), "--port", "0", "--device", "cpu"]])  # runs until stopped
    deadline = time.monotonic() + 120
    while "Serving" not in jobs.state(folder)["log"]:
        assert time.monotonic() < deadline and jobs.state(folder)["state"] == "running", jobs.state(folder)
        time.sleep(0.2)
    runner = int((folder / jobs.PID_FILE).read_text())
    os.kill(runner, signal.SIGKILL)
    jobs._children.pop(folder).wait()  # reaped, as the server would
    assert jobs.state(folder)["state"] == "running"  # its command still is
    assert jobs.stop(folder)
    while jobs.state(folder)["state"] == "running":
        assert time.monotonic() < deadline + 60
        time.sleep(0.2)
    assert jobs.state(folder)["state"] == "stopped"
    with pytest.raises(ProcessLookupError):
        os.killpg(runner, 0)


def test_names_made_of_file_names_are_plain():
    from imgtrain.ui.workspace import plain_name

    for text, expected in [("_leak", "leak"), ("model..v2", "model.v2"), ("..", "x"), ("é-photos", "photos"),
                           ("a b", "a-b"), ("-.-", "x")]:
        assert plain_name(text, "x", lambda n: False) == expected
    assert plain_name("pets", "x", lambda n: n in ("pets", "pets-2")) == "pets-3"


def test_a_run_stopped_under_earlier_defaults_resumes_from_the_page_with_them(tmp_path, image_dirs):
    """A run the page started under an earlier version (a cosine schedule, no average of the weights: the defaults
    then) and stopped after epoch 1: Resume passes what it was made with, which the form has no field for, and the
    run goes on from its checkpoint (it was refused, naming --lr-schedule and --ema, and the page had no way on)."""
    from imgtrain import train_pytorch_model
    from imgtrain.ui import jobs
    from imgtrain.ui.app import UI

    class Stop(BaseException):
        pass

    def stop_after_epoch_1(message: str) -> None:
        if message.startswith("epoch 1/"):
            raise Stop

    ui = UI(Workspace(tmp_path / "ws"), TOKEN, log=lambda message: None)
    folder = ui.workspace.run_dir("before", exists=False)
    folder.mkdir()
    shutil.copytree(image_dirs["untrained"], folder / "untrained")
    form = {"epochs": 2, "batch_size": 8, "image_size": 32}
    (folder / "run.json").write_text(json.dumps({
        "dataset": "shades", "model_name": "resnet18", "pretrained": False, "training": str(image_dirs["train"]),
        "validation": str(image_dirs["val"]), "parameters": form}))
    with pytest.raises(Stop):  # what the earlier version did, up to the Stop
        train_pytorch_model(folder / "untrained", image_dirs["train"], image_dirs["val"], folder / "trained", **form,
                            lr_schedule="cosine", ema=False, log=stop_after_epoch_1)
    ui.resume_run("before")
    deadline = time.monotonic() + 300
    while (state := jobs.state(folder / "job"))["state"] == "running":
        assert time.monotonic() < deadline, state
        time.sleep(0.5)
    assert state["state"] == "done", state["log"]
    assert "--epochs 2 --batch-size 8 --image-size 32 --no-ema --lr-schedule=cosine --resume" in state["log"]
    assert "after epoch 1" in state["log"] and (folder / "trained" / "model.safetensors").is_file()


def test_a_crafted_checkpoint_adds_no_argument_to_the_resumed_command(tmp_path):
    """What Resume reads from a checkpoint in the workspace becomes a flag only as a yes or no, or as one of the
    option's choices: `ema: "--output=/elsewhere"` put that output in the command; a huge value, or one nested past
    Python's recursion limit, made the job fail without a word."""
    import torch

    from imgtrain.directories.atomic import write_safetensors
    from imgtrain.training.train import flags_of_earlier_defaults, resume_dir_for

    output = tmp_path / "trained"
    resume_dir_for(output).mkdir()

    def made_with(state: str) -> list[str]:
        write_safetensors({"x": torch.zeros(1)}, resume_dir_for(output) / "checkpoint.safetensors", {"state": state})
        return flags_of_earlier_defaults(output)

    assert made_with(json.dumps({"parameters": {}})) == ["--no-ema", "--lr-schedule=cosine"]  # an earlier version's
    assert made_with(json.dumps({"parameters": {"ema": True, "lr_schedule": "linear"}})) == []  # this version's
    for crafted in ["--output=/elsewhere", 0, None, "x" * 200_000]:
        parameters = {"ema": crafted, "lr_schedule": crafted, "sampler": crafted, "class_weights": crafted}
        assert made_with(json.dumps({"parameters": parameters})) == [], crafted
    assert made_with("[" * 100_000 + "]" * 100_000) == []

"""A newcomer's session, end to end, in a real browser: ``ppg train serve.enabled=true`` (the real CLI,
its own local Ray cluster on 127.0.0.1, a bearer key), headless Chromium on ``/live`` watching the
reward curve grow, then on ``/`` picking a held-out persona, letting the simulated user speak,
and getting the live agent's reply with the policy version that answered and the judge's score;
and the terminal of that ``ppg train``: ppg's lines only, Ray's and vLLM's output in the run's log.

Chromium comes from Debian's ``chromium`` and ``chromium-driver`` packages (``scripts/setup.sh``
installs them); selenium drives it. The test skips, saying so, only where they are not installed.
``PPG_UI_SCREENSHOTS=DIR`` keeps the screenshots (the README's ``docs/chat.png`` comes from here).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
KEY = "ui-test-key"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
ITERATIONS = 14


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Training:
    """``ppg train serve.enabled=true serve.after_training=keep`` in a subprocess; its terminal output
    collected line by line."""

    def __init__(self, tmp: Path) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.runs = tmp / "runs"
        env = {**os.environ, "PPG_SERVE_API_KEY": KEY, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
        env.pop("RAY_ADDRESS", None)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ppg.cli", "train",
             f"run.iterations={ITERATIONS}", "run.sample_every=3", "run.final_eval_episodes=8",
             "run.checkpoint_every=7", "rollout.episodes_per_iteration=16",
             f"run.output_dir={self.runs}", "serve.enabled=true", "serve.after_training=keep",
             f"serve.port={self.port}"],
            cwd=tmp, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        self.out: list[str] = []
        self.err: list[str] = []
        for stream, sink in ((self.proc.stdout, self.out), (self.proc.stderr, self.err)):
            threading.Thread(
                target=lambda s=stream, k=sink: k.extend(iter(s.readline, "")), daemon=True
            ).start()

    def wait_for(self, text: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not any(text in line for line in self.out):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(
                    f"no {text!r} on the terminal:\n{''.join(self.out)}\n{''.join(self.err)[-3000:]}"
                )
            time.sleep(0.5)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # after_training=keep: serves until Ctrl-C / SIGTERM
        try:
            return self.proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


@pytest.fixture(scope="module")
def training(tmp_path_factory):
    run = Training(tmp_path_factory.mktemp("ui"))
    try:
        run.wait_for("watch it learn:", timeout=240)
        yield run
    finally:
        run.stop()


@pytest.fixture(scope="module")
def browser():
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        pytest.skip(
            f"Chromium is not installed ({CHROMIUM}, {CHROMEDRIVER}): scripts/setup.sh installs Debian's "
            "chromium and chromium-driver (apt-get install -y chromium chromium-driver)"
        )
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1280,860"):  # fmt: skip
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def screenshot(driver, name: str, tmp_path: Path) -> Path:
    """A PNG of the page, checked to be a real, non-empty image."""
    keep = os.environ.get("PPG_UI_SCREENSHOTS")
    path = (Path(keep) if keep else tmp_path) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    assert driver.save_screenshot(str(path))
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    assert width >= 800 and height >= 600 and len(data) > 20_000, (width, height, len(data))
    return path


def test_the_page_helpers_keep_the_api_key_and_stay_out_of_the_openapi_spec(training):
    client = httpx.Client(base_url=training.base, timeout=60)
    assert client.get("/").status_code == 200 and "Talk to the agent" in client.get("/").text
    assert client.get("/ui/personas").status_code == 401
    auth = {"authorization": f"Bearer {KEY}"}
    info = client.get("/ui/personas", headers=auth).json()
    splits = {p["split"] for p in info["personas"]}
    assert info["problem"] == "myopic" and splits == {"training", "held-out"}
    bad = client.post("/ui/score", headers=auth, json={"persona_id": "p000", "messages": "x", "response": ""})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "messages"
    assert client.post("/ui/suggest", headers=auth, json={"persona_id": "nobody"}).status_code == 404
    assert not any(
        p.startswith("/ui") or p in ("/", "/live") for p in client.get("/openapi.json").json()["paths"]
    )


def test_live_view_draws_the_reward_curve_as_it_grows(training, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(training.base + "/live")
    wait = WebDriverWait(browser, 120)
    wait.until(lambda d: d.find_element(By.ID, "key").is_displayed())  # the page asks for the key
    browser.find_element(By.ID, "key").send_keys(KEY)
    browser.find_element(By.ID, "savekey").click()

    def points(d) -> int:
        return int(d.find_element(By.ID, "curve").get_attribute("data-points") or 0)

    wait.until(lambda d: points(d) >= 1)
    first = points(browser)
    assert first < ITERATIONS, "the run ended before the page saw it grow"
    wait.until(lambda d: points(d) >= first + 2)
    assert len(browser.find_element(By.ID, "reward-line").get_attribute("points").split()) == points(browser)
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#samples table"))  # run.sample_every=3
    screenshot(browser, "live.png", tmp_path)


def test_chat_page_talks_to_the_live_agent_and_shows_the_version_and_score(training, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    browser.get(training.base + "/")  # the key is remembered in this tab
    wait = WebDriverWait(browser, 120)
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#persona option")) > 10)
    held_out = browser.find_elements(By.CSS_SELECTOR, "#persona optgroup")[1]
    Select(browser.find_element(By.ID, "persona")).select_by_value(
        held_out.find_elements(By.TAG_NAME, "option")[0].get_attribute("value")
    )
    assert browser.find_element(By.ID, "about").text.startswith("held-out:")
    for turn in range(3):
        browser.find_element(By.ID, "suggest").click()  # the simulated user's line for this turn
        wait.until(lambda d: d.find_element(By.ID, "input").get_attribute("value"))
        browser.find_element(By.ID, "send").click()
        wait.until(lambda d, n=turn + 1: len(d.find_elements(By.CSS_SELECTOR, ".msg.agent .score")) == n)
    replies = browser.find_elements(By.CSS_SELECTOR, ".msg.agent")
    versions = [int(r.get_attribute("data-version")) for r in replies]
    assert all(v >= 0 for v in versions) and versions == sorted(versions), versions
    assert all(-1 <= float(r.get_attribute("data-score")) <= 1 for r in replies)
    assert all(
        r.find_element(By.CSS_SELECTOR, ".version").text == f"policy v{v}"
        for r, v in zip(replies, versions, strict=True)
    )
    assert browser.find_element(By.ID, "status").get_attribute("class") != "error"
    screenshot(browser, "chat.png", tmp_path)


def test_the_terminal_shows_only_what_a_person_needs(training):
    training.wait_for("[ppg] done:", timeout=300)
    assert training.stop() == 0, "".join(training.err)[-3000:]
    out = "".join(training.out)
    lines = [line for line in training.out if line.strip()]
    assert f"[ppg] iter {ITERATIONS}/{ITERATIONS}" in out and "held-out evaluation" in out
    assert len(lines) <= ITERATIONS + 30, out  # one line per iteration, a short head and summary
    for noise in ("pid=", "Reporting training result", "RotaryEmbedding", "WARNING", "Loading"):
        assert noise not in out, f"{noise!r} reached the terminal:\n{out}"
    assert "".join(training.err).strip() == "", "nothing on stderr when nothing failed"
    (run,) = training.runs.iterdir()
    log = (run / "logs" / "console.log").read_text()
    assert "Reporting training result" in log and "RayTrainWorker" in log, "library output is kept"
    assert f"library output (Ray, vLLM, workers): {run / 'logs' / 'console.log'}" in out

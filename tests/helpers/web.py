"""Web servers and a real browser for the demo and study tests.

    with WebServer([sys.executable, "-m", "xpsr_jax.demo", ...], tmp_path) as server:
        Client(server.url)...                       # gradio_client against the running command
    with headless_chromium() as browser: ...       # Debian's chromium through its chromedriver

The servers are the real commands in subprocesses on 127.0.0.1 (a free port each); the browser is
the system's Chromium (packages chromium + chromium-driver, which `.ci/run` installs), started
with the flags this offline machine needs; nothing is downloaded.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def server_env(tmp_path: Path) -> dict:
    env = dict(os.environ, GRADIO_TEMP_DIR=str(tmp_path / "gradio"), GRADIO_ANALYTICS_ENABLED="False",
               HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


class WebServer:
    """A command serving a page on 127.0.0.1:PORT (`port` is appended as --port), its output in
    `log`; `start()` waits until the page answers (or fails with the command's output)."""

    def __init__(self, command: Sequence[str], tmp_path: Path, *, timeout: float = 300):
        self.port = free_port()
        self.command = [*command, "--port", str(self.port)]
        self.url = f"http://127.0.0.1:{self.port}/"
        self.log = tmp_path / f"server-{self.port}.log"
        self.env = server_env(tmp_path)
        self.timeout = timeout
        self.process: subprocess.Popen | None = None

    def start(self) -> WebServer:
        self._log_file = self.log.open("ab")
        self.process = subprocess.Popen(self.command, stdout=self._log_file, stderr=subprocess.STDOUT, env=self.env,
                                        cwd=REPO)
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"{' '.join(self.command)} exited with {self.process.returncode}:\n"
                                     + self.output()[-4000:])
            try:
                with urllib.request.urlopen(self.url + "config", timeout=5) as response:
                    if response.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.5)
        self.stop()
        raise AssertionError(f"{self.url} did not answer within {self.timeout} s:\n" + self.output()[-4000:])

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def kill(self) -> None:
        """SIGKILL: no handler, no clean-up runs."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=30)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()
        if getattr(self, "_log_file", None) is not None:
            self._log_file.close()
            self._log_file = None

    def __enter__(self) -> WebServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def python_module(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


@contextlib.contextmanager
def headless_chromium(tmp_path: Path, *, width: int = 1280, height: int = 1000) -> Iterator:
    """A Selenium driver of the system's Chromium (fails, naming the Debian packages, when absent)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if shutil.which(path) is None]
    assert not missing, f"{missing} not installed: apt-get install chromium chromium-driver (.ci/run does)"
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--window-size={width},{height}",
                 f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(flag)
    # An explicit driver path: Selenium Manager (which would download one) is never asked.
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    try:
        yield driver
    finally:
        driver.quit()


def save_screenshot(driver, name: str, tmp_path: Path) -> Path:
    """A PNG of the page in tmp_path, and in $XPSR_SCREENSHOTS when set (how docs/images is made)."""
    path = tmp_path / name
    driver.save_screenshot(str(path))
    if os.environ.get("XPSR_SCREENSHOTS"):
        target = Path(os.environ["XPSR_SCREENSHOTS"]) / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
    return path

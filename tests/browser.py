"""The draw-a-digit page (predict_tta.py --demo) in a subprocess, driven by headless Chromium.

Shared by tests/test_demo.py and tools/screenshot_demo.py. Chromium and chromedriver are Debian's
(apt-get install chromium chromium-driver); selenium is given the driver's path, so nothing is downloaded.
"""
import contextlib
import importlib.util
import itertools
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync")
# Digits as strokes through points given as fractions of the paper (x to the right, y down), drawn as one hand would.
STROKES = {
    "1": [[(0.5, 0.2), (0.5, 0.8)]],
    "7": [[(0.3, 0.25), (0.7, 0.25), (0.45, 0.8)]],
}


def missing(browser=True):
    """What the page's tests lack, as one sentence, or None: Gradio and gradio_client, and for a browser selenium,
    Chromium and chromedriver."""
    modules = ["gradio", "gradio_client"] + (["selenium"] if browser else [])
    absent = [m for m in modules if importlib.util.find_spec(m) is None]
    absent += [path for path in ((CHROMIUM, CHROMEDRIVER) if browser else ()) if not os.access(path, os.X_OK)]
    if not absent:
        return None
    return (f"{', '.join(absent)} missing: pip install -r requirements-demo.txt "
            "and apt-get install chromium chromium-driver")


def free_port():
    """A port of 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def demo_server(weights, folder, *options, timeout=120):
    """predict_tta.py --weights WEIGHTS --demo on a free port of 127.0.0.1; yields its URL, Ctrl-C at the end.

    The server runs in `folder`/cwd with its home and temporary folders in `folder` too (home, tmp), and its
    output goes to `folder`/demo.log, so a test can check what it wrote.
    """
    folder = Path(folder)
    for sub in ("cwd", "home", "tmp"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = dict(os.environ, HOME=str(folder / "home"), TMPDIR=str(folder / "tmp"), PYTHONDONTWRITEBYTECODE="1")
    command = [sys.executable, str(ROOT / "predict_tta.py"), "--weights", str(weights), "--demo", "--port", str(port),
               *map(str, options)]
    with open(folder / "demo.log", "w") as log:
        # Ctrl-C reaches the server even when this process was started in the background, where the shell
        # leaves SIGINT ignored and children inherit that (Python then installs no KeyboardInterrupt handler)
        process = subprocess.Popen(command, cwd=folder / "cwd", env=env, stdout=log, stderr=subprocess.STDOUT,
                                   preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    url = f"http://127.0.0.1:{port}/"
    try:
        wait_until_serving(url, process, folder / "demo.log", timeout)
        yield url
    finally:
        process.send_signal(signal.SIGINT)  # as Ctrl-C: the server closes and its temporary folder is removed
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def wait_until_serving(url, process, log, timeout):
    """Return once the page answers; an AssertionError with the server's output if it exits or takes too long."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"the demo server exited with code {process.returncode}:\n{log.read_text()}")
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        time.sleep(0.5)
    raise AssertionError(f"the demo server did not answer within {timeout}s:\n{log.read_text()}")


@contextlib.contextmanager
def chromium(folder, width=1200, height=900):
    """Headless Chromium with its profile and home in `folder`; yields the selenium driver, quits at the end."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    folder = Path(folder)
    for sub in ("profile", "home"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={folder / 'profile'}", f"--window-size={width},{height}"):
        options.add_argument(flag)
    # Chromium's temporary files go to a short path of its own: its sockets' paths must fit in 108 bytes.
    with tempfile.TemporaryDirectory(prefix="chromium-") as tmp:
        env = dict(os.environ, HOME=str(folder / "home"), TMPDIR=tmp)
        driver = webdriver.Chrome(service=Service(CHROMEDRIVER, env=env), options=options)
        try:
            yield driver
        finally:
            driver.quit()


def open_page(driver, url, timeout=60):
    """Load the page and wait until its canvas is there to draw on."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    driver.get(url)
    WebDriverWait(driver, timeout).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#canvas canvas"))
    driver.execute_script(COUNT_REQUESTS)


# The page's requests (Gradio's client uses fetch), counted so that a test can wait for them to end before it leaves
# the page: a browser that goes while an upload is in flight leaves the server a ClientDisconnect traceback.
COUNT_REQUESTS = """
window.requestsCounted = {started: 0, ended: 0};
const fetchFirst = window.fetch;
window.fetch = function (...args) {
  window.requestsCounted.started++;
  return fetchFirst.apply(this, args).finally(() => window.requestsCounted.ended++);
};
"""


def wait_until_idle(driver, quiet=1.0, timeout=60):
    """Return once the page has had no request in flight, and begun none, for `quiet` seconds."""
    deadline, last, since = time.monotonic() + timeout, None, time.monotonic()
    while time.monotonic() < deadline:
        counted = driver.execute_script("return window.requestsCounted")
        if counted != last or counted["started"] != counted["ended"]:
            last, since = counted, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return
        time.sleep(0.1)
    raise AssertionError(f"the page's requests did not end within {timeout}s: {last}")


def draw(driver, strokes, at=0.5, steps=10, paper=3):
    """Draw one digit's strokes on the page's canvas, centred `at` that fraction of the paper's width (the paper is
    `paper` times as wide as tall): press, move segment by segment in small steps, release."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    canvas = driver.find_elements(By.CSS_SELECTOR, "#canvas canvas")[-1]
    # The canvas element can be larger than the paper at its centre: the paper fits it, the digit a square well inside.
    height = min(canvas.size["width"] / paper, canvas.size["height"])
    side, shift = 0.75 * height, (at - 0.5) * paper * height
    for stroke in strokes:
        points = [(round(shift + (x - 0.5) * side), round((y - 0.5) * side)) for x, y in stroke]  # from the centre
        actions = ActionChains(driver).move_to_element_with_offset(canvas, *points[0]).click_and_hold()
        for (x0, y0), (x1, y1) in itertools.pairwise(points):
            previous = (x0, y0)
            for k in range(1, steps + 1):
                point = (x0 + round((x1 - x0) * k / steps), y0 + round((y1 - y0) * k / steps))
                actions.move_by_offset(point[0] - previous[0], point[1] - previous[1])
                previous = point
        actions.release().perform()


def wait_for_answer(driver, expected=None, timeout=60):
    """(what the page read, the shown images' natural size, their size on the page) once it shows an answer whose
    image has loaded (the image loads after the reading appears); with `expected` (reading, natural size), once it
    shows that one. On a timeout, selenium's TimeoutException says what the page showed last."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    last = [None]

    def answer(driver):
        digits = driver.find_elements(By.CSS_SELECTOR, "#probabilities .output-class")
        images = driver.find_elements(By.CSS_SELECTOR, "#seen img")
        if not (digits and digits[0].text.strip() and images):
            return None
        natural = driver.execute_script("return [arguments[0].naturalWidth, arguments[0].naturalHeight]", images[0])
        shown = images[0].size
        last[0] = found = (digits[0].text.strip(), tuple(natural), (shown["width"], shown["height"]))
        return found if natural[0] and (expected is None or found[:2] == expected) else None

    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.2).until(answer)
    except TimeoutException:
        raise TimeoutException(f"after {timeout}s the page showed (reading, image size, size shown) {last[0]}") \
            from None

"""predict_tta.py --demo: the draw-a-number page, in a real browser and through its API."""
import os
import socket
import sys
import tempfile

import numpy as np
import pandas as pd
import pytest
from browser import STROKES, chromium, demo_server, draw, missing, open_page, wait_for_answer, wait_until_idle
from conftest import assert_user_error, run_script
from photo_render import render_as_photo
from PIL import Image

import data


def require(browser=True):
    """Skip with what is missing; under CI=true, fail instead, so CI cannot pass without running these tests."""
    problem = missing(browser)
    if problem and os.environ.get("CI") == "true":
        pytest.fail(f"CI=true and the demo's test environment is incomplete: {problem}")
    if problem:
        pytest.skip(problem)


@pytest.fixture
def in_process(monkeypatch, tmp_path):
    """For --demo run in this process: the environment it sets is restored, its temporary folder is tmp_path/tmp."""
    for name in ("GRADIO_ANALYTICS_ENABLED", "GRADIO_TEMP_DIR", "MPLCONFIGDIR"):
        monkeypatch.delenv(name, raising=False)
    for sub in ("cwd", "tmp"):
        (tmp_path / sub).mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    yield tmp_path / "cwd"
    assert list((tmp_path / "cwd").iterdir()) == [] and list((tmp_path / "tmp").iterdir()) == []


def test_demo_without_gradio_says_how_to_install_it(monkeypatch, in_process):
    monkeypatch.setitem(sys.modules, "gradio", None)  # `import gradio` raises ImportError, as when not installed
    result = run_script("predict_tta.py", "--weights", "nowhere.pth", "--demo", cwd=in_process, check=False)
    assert_user_error(result, "--demo needs Gradio", "pip install -r requirements-demo.txt")


def test_a_port_in_use_is_one_line(small_vgg, in_process):
    require(browser=False)
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        result = run_script("predict_tta.py", "--weights", small_vgg, "--demo", "--port", port, cwd=in_process,
                            check=False)
    assert_user_error(result, f"cannot serve on 127.0.0.1:{port}: Address already in use", "pick another --port")


@pytest.mark.parametrize("options, fragment", [
    (["--demo", "--images", "x.png"], "it takes no --images"),
    (["--demo", "--out", "p.csv", "--save-probs", "p.npy"], "it takes no --out, --save-probs"),
    (["--demo", "--invert", "yes"], "it takes no --invert"),
    (["--demo", "--test-csv", "test.csv"], "it takes no --test-csv"),
    (["--port", "8000"], "--port go with --demo"),
    (["--host", "0.0.0.0", "--images", "x.png"], "--host go with --demo"),
])
def test_options_that_make_no_sense_with_demo_are_refused(tmp_path, options, fragment):
    assert_user_error(run_script("predict_tta.py", *options, cwd=tmp_path, check=False), fragment)


@pytest.fixture(scope="module")
def server(tmp_path_factory, small_vgg):
    """The page for the small vgg (default TTA), on a free port of 127.0.0.1; checks what it left behind at the end."""
    require(browser=False)
    folder = tmp_path_factory.mktemp("demo_server")
    with demo_server(small_vgg, folder) as url:
        yield url, folder
    assert list((folder / "tmp").iterdir()) == []   # its temporary folder is gone
    assert list((folder / "cwd").iterdir()) == []   # nothing written where it ran
    assert list((folder / "home").iterdir()) == []  # nor in the home folder
    assert "Traceback" not in (folder / "demo.log").read_text()


@pytest.fixture(scope="module")
def client(server, tmp_path_factory):
    from gradio_client import Client
    return Client(server[0], verbose=False, download_files=str(tmp_path_factory.mktemp("downloads")))


def test_drawn_digits_are_read_in_the_browser(server, tmp_path):
    require(browser=True)
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    with chromium(tmp_path) as driver:
        open_page(driver, server[0])
        for digit in ("1", "7"):
            draw(driver, STROKES[digit])
            predicted, natural, shown = wait_for_answer(driver)
            assert predicted == digit
            assert natural == (28, 28) and min(shown) >= 8 * 28  # the image the model saw, shown 8x enlarged
            assert driver.find_element(By.ID, "message").text == ""
            # Clear once the drawing's last reading is in: the Sketchpad sends a stroke's picture after the stroke, and
            # one sent after Clear is read and shown beside the empty canvas (Gradio's race, not the page's).
            wait_until_idle(driver)
            driver.find_element(By.ID, "clear").click()
            WebDriverWait(driver, 30).until(lambda d: not d.find_elements(By.CSS_SELECTOR, "#seen img"))
        # a number, on a fresh page: two digits side by side are read left to right, each boxed and listed
        wait_until_idle(driver)
        open_page(driver, server[0])
        draw(driver, STROKES["7"], at=0.62)
        draw(driver, STROKES["1"], at=0.38)
        try:                                                            # the two 28x28 digits, side by side
            wait_for_answer(driver, expected=("17", (56, 28)))
        except TimeoutException as timeout:
            driver.save_screenshot(str(tmp_path / "number.png"))
            raise AssertionError(f"not 17 and its 56x28 image: {timeout.msg} (see {tmp_path / 'number.png'})") \
                from None
        rows = driver.find_elements(By.CSS_SELECTOR, "#readings tbody tr")
        assert [row.text.split()[:2] for row in rows] == [["1", "1"], ["2", "7"]]
        assert driver.find_elements(By.CSS_SELECTOR, "#boxes img")
        wait_until_idle(driver)


@pytest.fixture(scope="module")
def digit_files(tmp_path_factory, mnist_dir):
    """20 MNIST test digits rendered as photos (PNG files): dark on light paper, larger, off-centre, noisy."""
    folder = tmp_path_factory.mktemp("digit_files")
    images, labels = data.load_mnist(mnist_dir, "test")
    rng = np.random.default_rng(1)
    paths = [folder / f"digit{i:02d}.png" for i in range(20)]
    for image, path in zip(images, paths, strict=False):  # the first 20 of the test set
        render_as_photo(image.numpy(), rng).save(path)
    return paths


def test_the_page_answers_as_predict_tta_images_does(client, small_vgg, digit_files, tmp_path):
    from gradio_client import handle_file
    for path in digit_files:
        label, seen, boxes, readings, message = client.predict(handle_file(path), api_name="/photo")
        assert message == "" and Image.open(seen).size == (28, 28) and len(readings.strip().splitlines()) == 3
        assert Image.open(boxes).size == Image.open(path).size
        # --images one file at a time: a TTA variant's random shifts depend on an image's place in its batch
        run_script("predict_tta.py", "--weights", small_vgg, "--images", path, "--out", "expected.csv", cwd=tmp_path)
        expected = pd.read_csv(tmp_path / "expected.csv").iloc[0]
        assert label["label"] == str(expected["label"]), path.name
        probabilities = {c["label"]: c["confidence"] for c in label["confidences"]}
        assert np.allclose([probabilities[str(d)] for d in range(10)], [expected[f"p{d}"] for d in range(10)],
                           atol=1e-4, rtol=0), path.name


def test_the_page_answers_as_the_python_reader_does(client, small_vgg, digit_files):
    from gradio_client import handle_file
    from predict_tta import DigitReader
    reader = DigitReader(small_vgg, device="cpu", tta=4)  # the page's default TTA
    for path in digit_files[:5]:
        label, *_ = client.predict(handle_file(path), api_name="/photo")
        labels, probs = reader.predict(path)
        assert label["label"] == str(labels[0].item()), path.name
        confidences = {c["label"]: c["confidence"] for c in label["confidences"]}
        assert np.allclose([confidences[str(d)] for d in range(10)], probs[0].numpy(), atol=1e-6, rtol=0), path.name


def test_each_endpoint_called_with_nothing_answers_without_a_server_error(server):
    import json
    import urllib.request
    answers = {}
    for endpoint in ("photo", "drawing"):  # what a client sends with no file or no drawing
        request = urllib.request.Request(f"{server[0].rstrip('/')}/gradio_api/run/{endpoint}", method="POST",
                                         data=json.dumps({"data": [None]}).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            assert response.status == 200, endpoint
            answers[endpoint] = json.loads(response.read())["data"]
    assert not answers["photo"][0]
    assert answers["photo"][4] == "**no photo: upload an image file of a number or a digit**"
    assert "Traceback" not in (server[1] / "demo.log").read_text()


def test_bad_input_gets_a_message_and_the_server_keeps_serving(client, digit_files, tmp_path):
    from gradio_client import handle_file
    Image.new("RGB", (280, 280), "white").save(tmp_path / "blank.png")
    speck = np.full((280, 280), 255, dtype=np.uint8)
    speck[140, 140:143] = 0                                          # three pixels of ink
    Image.fromarray(speck).save(tmp_path / "speck.png")
    Image.new("L", (8000, 7000), "white").save(tmp_path / "huge.png")  # 56 megapixels in a small file
    (tmp_path / "notes.png").write_text("this is not an image")
    (tmp_path / "notes.txt").write_text("this is not an image either")

    def drawing(path):
        return {"background": None, "layers": [], "composite": handle_file(path)}

    answers = {
        "blank": client.predict(drawing(tmp_path / "blank.png"), api_name="/drawing"),
        "speck": client.predict(drawing(tmp_path / "speck.png"), api_name="/drawing"),
        "huge": client.predict(handle_file(tmp_path / "huge.png"), api_name="/photo"),
        "notes": client.predict(handle_file(tmp_path / "notes.png"), api_name="/photo"),
        "text": client.predict(handle_file(tmp_path / "notes.txt"), api_name="/photo"),
    }
    for name, (label, seen, boxes, _, _) in answers.items():
        assert not label and seen is None and boxes is None, name
    assert answers["blank"][4].startswith("**the drawing: no digit found")
    assert answers["speck"][4].startswith("**the drawing: no digit found")
    assert answers["huge"][4].startswith("**huge.png: 8000x7000 pixels, more than a photo of a digit needs")
    assert answers["notes"][4].startswith("**notes.png: not a readable image")
    assert answers["text"][4].startswith("**notes.txt: not a readable image")
    label, *_, message = client.predict(drawing(digit_files[0]), api_name="/drawing")
    assert label["label"] and message == ""                   # and the next good input is read as usual

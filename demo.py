"""The draw-a-number page: draw digits on a canvas, or upload a photo, and watch the model read them.

    python predict_tta.py --demo                 # the released model (or CNN_best_model.pth when it is here)
    python predict_tta.py --demo --weights models --tta 4

predict_tta.py --demo imports this file, and only then: Gradio and the browser test's packages are optional
(pip install -r requirements-demo.txt). The page reads every drawing and photo as a whole number through
DigitReader.read_number, as --images --number does, and shows the 28x28 digits the model saw and where it found
them. In this file: importing Gradio, one drawing's answer, the page, then serving it.
"""
import functools
import os
import socket
import tempfile
from pathlib import Path

import numpy as np
import torch

from cli import UserError
from photos import boxed_photo

CANVAS_SIZE = (840, 280)  # pixels; room for a number. The brush is a tenth of the height wide, as MNIST's strokes are
MAX_UPLOAD = "50mb"  # refused before it is stored; a phone's photo of a digit is a few MB
# The 28x28 inputs are shown 8x enlarged with every pixel a sharp square, so a thin or off-centre digit is plain to see.
PAGE_CSS = "#seen img { width: 100%; height: 224px; object-fit: contain; image-rendering: pixelated; }"


def import_gradio(folder):
    """The gradio module, with analytics off and what it writes (uploads, images it serves, matplotlib's font cache)
    kept in `folder`; a UserError when it is not installed."""
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    os.environ["GRADIO_TEMP_DIR"] = folder  # read when gradio is imported
    os.environ["MPLCONFIGDIR"] = folder     # gradio imports matplotlib, which would cache its fonts in the home folder
    try:
        import gradio
    except ImportError:
        raise UserError("--demo needs Gradio, which is not installed: pip install -r requirements-demo.txt") from None
    return gradio


def page_answer(reader, source, name):
    """The page's outputs for one drawing or photo, read as a number: (the reading: one digit's ten probabilities,
    or the number with how sure the model is of all its digits; the 28x28 digits the model saw, side by side; the
    picture with the boxes; each digit's reading as a table; a message). Bad input is the message alone."""
    try:
        number = reader.read_number(source, name=name)
    except UserError as error:
        return None, None, None, "", f"**{error}**"
    sure = number.probabilities.max(1).values
    if len(number.labels) == 1:
        reading = {str(d): float(p) for d, p in enumerate(number.probabilities[0])}
    else:
        reading = {number.text: float(sure.prod())}
    rows = enumerate(zip(number.labels, sure, strict=True), 1)
    table = "| digit | reads | sure |\n|---|---|---|\n" + "".join(f"| {k} | {int(d)} | {float(p):.2f} |\n"
                                                                  for k, (d, p) in rows)
    seen = torch.cat(list(number.images), dim=1).numpy()                          # [28, 28 N]
    return reading, seen, np.asarray(boxed_photo(source, number.boxes, number.labels)), table, ""


def demo_page(gr, predict, title):
    """The page: a canvas and a photo upload in; the number read, the 28x28 inputs, the boxes, each digit's reading
    and any message out. predict(source, name) gives page_answer's outputs."""
    from PIL import Image
    width, height = CANVAS_SIZE
    brush = gr.Brush(default_size=height // 20, colors=["#000000"], color_mode="fixed")  # a radius
    # With white paper to draw on, the canvas opens with the brush in hand (empty, it asks for a tool first).
    paper = {"background": Image.new("RGB", CANVAS_SIZE, "white"), "layers": [], "composite": None}
    with gr.Blocks(title="Draw a number", analytics_enabled=False) as page:
        gr.Markdown(f"## Draw a number\n{title}. Draw digits with the mouse, a finger or a pen, left to right, or "
                    "upload a photo of some.")
        canvas = gr.Sketchpad(paper, label="Draw a number", type="pil", canvas_size=CANVAS_SIZE, brush=brush,
                              layers=False, elem_id="canvas")
        with gr.Row():
            clear = gr.ClearButton(value="Clear", elem_id="clear")
            # any file type: what is not an image gets read_greyscale's message, as with --images
            photo = gr.File(label="or upload a photo", type="filepath", elem_id="photo")
        with gr.Row():
            with gr.Column(min_width=height):
                probabilities = gr.Label(num_top_classes=10, label="Read as", elem_id="probabilities")
                message = gr.Markdown(elem_id="message")
            with gr.Column(min_width=height):
                seen = gr.Image(label="What the model saw (28x28 each)", format="png", interactive=False,
                                buttons=["download"], height=height, elem_id="seen")
            with gr.Column(min_width=height):
                boxes = gr.Image(label="Where it found the digits", format="png", interactive=False, height=height,
                                 elem_id="boxes")
                readings = gr.Markdown(elem_id="readings")
        outputs = [probabilities, seen, boxes, readings, message]
        clear.add([canvas, photo, *outputs])

        def read_drawing(value):
            if value is not None and value["composite"] is not None:
                return predict(value["composite"], "the drawing")
            if value is not None and value["background"] is not None:  # a fresh page's first stroke begun
                return (gr.skip(),) * len(outputs)
            return None, None, None, "", ""                   # the canvas cleared, or the API called with nothing

        # Gradio's Sketchpad sends "input" as a stroke ends, before it uploads the new picture, so "input" can carry
        # the picture before that stroke; "change" follows the upload, except for a fresh page's first stroke. On
        # both, the last read is of the picture as drawn: always_last runs the latest one after the one in flight.
        # So is a cleared canvas's empty answer: a reading still in flight when Clear is pressed cannot come back.
        gr.on([canvas.input, canvas.change], read_drawing, canvas, outputs, api_name="drawing",
              trigger_mode="always_last", show_progress="hidden")

        def read_photo(path):
            if path is None:  # the API called without a file
                return None, None, None, "", "**no photo: upload an image file of a number or a digit**"
            return predict(path, Path(path).name)

        photo.upload(read_photo, photo, outputs, api_name="photo")
    return page


def check_can_serve(host, port):
    """One line saying why, when host:port cannot be served on (Gradio would print a traceback)."""
    try:
        socket.create_server((host, port)).close()
    except OSError as error:  # the port is taken, or the address is not one of this machine's
        raise UserError(f"cannot serve on {host}:{port}: {error.strerror or error}; "
                        "pick another --port or --host") from None


def serve(make_reader, host, port):
    """Serve the page on host:port until Ctrl-C, reading with the DigitReader that make_reader() gives; Gradio's
    uploads and served images live in a temporary folder removed at exit."""
    with tempfile.TemporaryDirectory(prefix="predict_tta-demo-") as folder:
        gr = import_gradio(folder)  # before the models load: without Gradio, that is the one line
        reader = make_reader()
        title = f"{len(reader.ensemble)} model(s) x {len(reader.variants)} TTA variant(s)"
        predict = functools.partial(page_answer, reader)
        page = demo_page(gr, predict, title)
        check_can_serve(host, port)
        _, url, _ = page.launch(server_name=host, server_port=port, share=False, run_history=False,
                                enable_monitoring=False, mcp_server=False, max_file_size=MAX_UPLOAD, css=PAGE_CSS,
                                quiet=True, prevent_thread_lock=True)
        print(f"draw a number at {url} (Ctrl-C to stop)")
        page.block_thread()

"""Pipeline B, prediction: average an ensemble's softmax over test-time augmentations, write submission.csv.

    python predict_tta.py --test-csv data/digit-recognizer/test.csv               # every complete model in models/
    python predict_tta.py --weights CNN_best_model.pth --data mnist --no-tta      # one model on MNIST's test set
    python predict_tta.py --weights CNN_best_model.pth --images photo.jpg my_digits/   # people's own images
    python predict_tta.py --weights CNN_best_model.pth --demo    # draw a digit in the browser (requirements-demo.txt)

Each checkpoint brings its own architecture and normalization. The same inputs, seed and batch size give
the same submission: each TTA variant draws its random shifts from its own seeded generator.
"""
import functools
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

from data import (
    EVAL_BATCH_SIZE,
    Parser,
    TTA_VARIANTS,
    UserError,
    add_data_arguments,
    add_device_arguments,
    atomic_path,
    autocast,
    batch_indices,
    check_output_folder,
    checkpoint_files,
    check_outputs,
    find_images,
    is_complete,
    load_checkpoint,
    load_data,
    model_from_checkpoint,
    model_input,
    pick_device,
    pick_precision,
    port_number,
    positive_int,
    preprocess_image,
    progress_bar,
    resolve_data_arguments,
    run_cli,
    seed_int,
    to_unit_float,
    write_frame,
    write_numpy,
    write_submission,
)

DEMO_HOST, DEMO_PORT = "127.0.0.1", 7860
# --demo serves one drawing or photo at a time: options about files and batches have nothing to act on
NOT_WITH_DEMO = ("--images", "--invert", "--show-preprocessed", "--data", "--data-dir", "--test-csv", "--labels",
                 "--out", "--save-probs", "--batch-size")
CANVAS_SIZE = 280  # pixels a side; the brush is a tenth of that wide, as MNIST's strokes are of its 28 pixels
MAX_UPLOAD = "50mb"  # refused before it is stored; a phone's photo of a digit is a few MB
# The 28x28 input is shown 8x enlarged with every pixel a sharp square, so a thin or off-centre digit is plain to see.
PAGE_CSS = "#seen img { width: 224px; height: 224px; object-fit: contain; image-rendering: pixelated; }"


def find_checkpoints(paths):
    """[(path, checkpoint dict)] from files and folders; a folder contributes every complete *.pth in it."""
    found = []
    for path in map(Path, paths):
        if path.is_dir():
            candidates = [(p, load_checkpoint(p)) for p in checkpoint_files([path])]
            for skipped, checkpoint in candidates:
                if not is_complete(checkpoint):
                    print(f"skipping {skipped}: training did not finish (rerun its training command to resume)")
            complete = [(p, checkpoint) for p, checkpoint in candidates if is_complete(checkpoint)]
            if not complete:
                raise UserError(f"{path}: no complete checkpoint (*.pth) in this folder; train first or pass --weights FILE")
            found += complete
        elif path.is_file():
            found.append((path, load_checkpoint(path)))
        else:
            raise UserError(f"{path}: no such checkpoint file or folder")
    return found


def load_ensemble(paths, device):
    """[(model, normalization, path)] for every checkpoint found in paths."""
    ensemble = []
    for path, checkpoint in find_checkpoints(paths):
        model, _ = model_from_checkpoint(path, device, checkpoint)
        ensemble.append((model, checkpoint["normalization"], path))
    return ensemble


@torch.inference_mode()
def ensemble_probabilities(ensemble, images, variants, precision, seed, batch_size=EVAL_BATCH_SIZE):
    """Mean softmax [N, 10] over every model and every TTA variant, for uint8 images [N, 28, 28] on the device.

    Each batch is augmented once per variant and shared by all models; variant i draws from a generator
    seeded with seed + i, so the result depends only on the inputs, the seed and the batch size. A model
    whose outputs are not finite is named in a UserError: its NaNs would otherwise label every image 0.
    """
    device = images.device
    generators = [torch.Generator(device).manual_seed(seed + i) for i in range(len(variants))]
    total = torch.zeros(len(images), 10, device=device)
    finite = torch.ones(len(ensemble), dtype=torch.bool, device=device)  # per model, read once at the end
    batches = batch_indices(len(images), batch_size)
    progress = progress_bar(len(batches), "predict")
    for index in batches:
        for variant, generator in zip(variants, generators):
            x = to_unit_float(images[index], variant, generator)          # [B, 1, 28, 28] in 0..1
            for m, (model, normalization, _) in enumerate(ensemble):
                with autocast(device, precision):
                    logits = model(model_input(x, normalization)).float()   # [B, 10]
                finite[m] &= torch.isfinite(logits).all()
                total[index] += torch.softmax(logits, 1)
        progress.update()
    progress.close()
    for ok, (_, _, path) in zip(finite.tolist(), ensemble):
        if not ok:
            raise UserError(f"{path}: the model's outputs are NaN or Inf on these images; nothing was written")
    return total / (len(ensemble) * len(variants))


def tta_variants(count):
    """The first `count` variants: 1 is plain prediction (identity only)."""
    if not 1 <= count <= len(TTA_VARIANTS):
        raise UserError(f"--tta must be between 1 and {len(TTA_VARIANTS)}, got {count}")
    return TTA_VARIANTS[:count]


def predict_images(args, ensemble, variants, device, precision):
    """Predict each image file; a bad file is one line on stderr, and a UserError ends the run after the others."""
    files, problems = find_images(args.images)
    paths, digits = [], []
    for path in files:
        try:
            digits.append(preprocess_image(path, args.invert))
            paths.append(path)
        except UserError as error:
            problems.append(str(error))
    if digits:
        images = torch.stack(digits)                                                  # uint8 [N, 28, 28]
        probs = ensemble_probabilities(ensemble, images.to(device), variants, precision, args.seed, args.batch_size).cpu()
        top = probs.topk(2, dim=1)
        for path, values, labels in zip(paths, top.values, top.indices):
            print(f"{path}: {labels[0]} ({values[0]:.2f}), next {labels[1]} ({values[1]:.2f})")
        if args.out:
            frame = pd.DataFrame(probs.numpy().round(6), columns=[f"p{d}" for d in range(10)])
            frame.insert(0, "path", [str(path) for path in paths])
            frame.insert(1, "label", top.indices[:, 0].numpy())
            frame.insert(2, "probability", top.values[:, 0].numpy().round(6))
            write_frame(args.out, frame)
            print(f"wrote {args.out} ({len(paths)} rows)")
        if args.show_preprocessed:
            save_preprocessed(Path(args.show_preprocessed), paths, images)
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    if problems:
        raise UserError(f"{len(problems)} of the inputs could not be predicted (each named above)")


def preprocessed_names(paths):
    """A distinct PNG name per input: digit.png and digit.jpg become digit_28x28.png and digit.jpg_28x28.png."""
    stems = [path.stem for path in paths]
    return [f"{path.stem if stems.count(path.stem) == 1 else path.name}_28x28.png" for path in paths]


def save_preprocessed(folder, paths, images):
    """The 28x28 inputs exactly as the model saw them (before normalization), one PNG per file."""
    from PIL import Image
    names = preprocessed_names(paths)
    for name, image in zip(names, images):
        with atomic_path(folder / name) as tmp:
            Image.fromarray(image.numpy()).save(tmp, format="PNG")
    print(f"wrote {len(set(names))} preprocessed images to {folder}/")


def parse_args(argv=None):
    parser = Parser(__doc__)
    inputs = parser.add_argument_group("data")
    inputs.add_argument("--weights", nargs="+", default=["models"], help="checkpoint files and/or folders of them")
    add_data_arguments(inputs, default="csv", split="test")
    images = parser.add_argument_group("own images")
    images.add_argument("--images", nargs="+", help="predict these image files and folders of them (PNG, JPEG, BMP, ...) instead")
    images.add_argument("--invert", choices=["auto", "yes", "no"], default="auto",
                        help="with --images: make the ink white on black; auto inverts when the border is light")
    images.add_argument("--show-preprocessed", help="with --images: save the 28x28 images the model saw to this folder")
    prediction = parser.add_argument_group("prediction")
    prediction.add_argument("--tta", type=positive_int, default=len(TTA_VARIANTS), help="number of TTA variants (1 = none)")
    prediction.add_argument("--no-tta", dest="tta", action="store_const", const=1, help="plain prediction, same as --tta 1")
    prediction.add_argument("--batch-size", type=positive_int, default=EVAL_BATCH_SIZE)
    prediction.add_argument("--seed", type=seed_int, default=42, help="seed of the TTA variants' random shifts")
    files = parser.add_argument_group("files")
    files.add_argument("--out", help="CSV to write (default: submission.csv; with --images, only written when given)")
    files.add_argument("--save-probs", help="also save the averaged probabilities [N, 10] to this .npy file")
    add_device_arguments(parser)
    page = parser.add_argument_group("draw-a-digit page")
    page.add_argument("--demo", action="store_true",
                      help="serve a page to draw a digit on (or upload a photo) and watch the model read it "
                           "(needs pip install -r requirements-demo.txt)")
    page.add_argument("--host", default=DEMO_HOST,
                      help="with --demo: the address to serve on; 0.0.0.0 exposes the model to everyone on the network")
    page.add_argument("--port", type=port_number, default=DEMO_PORT, help="with --demo: the port to serve on")
    args = parser.parse_args(argv)
    if args.demo and (extra := changed_options(parser, args, NOT_WITH_DEMO)):
        raise UserError(f"--demo predicts what is drawn or uploaded on its page; it takes no {', '.join(extra)}")
    if not args.demo and (extra := changed_options(parser, args, ("--host", "--port"))):
        raise UserError(f"{' and '.join(extra)} go with --demo")
    args = resolve_data_arguments(args)
    if args.images is None and (args.invert != "auto" or args.show_preprocessed):
        parser.error("--invert and --show-preprocessed go with --images")
    if args.images is None and args.out is None and not args.demo:
        args.out = "submission.csv"
    return args


def changed_options(parser, args, flags):
    """The flags among `flags` whose value differs from their default, that is, that were given."""
    dests = [flag[2:].replace("-", "_") for flag in flags]
    return [flag for flag, dest in zip(flags, dests) if getattr(args, dest) != parser.get_default(dest)]


def check_paths(args):
    """Before any work: outputs writable and distinct from every input (test CSV, labels, weights, images)."""
    inputs = {"--weights": checkpoint_files(args.weights), "--images": args.images or []}
    if args.images is None and args.data == "csv":
        inputs.update({"--test-csv": [args.test_csv], "--labels": [args.labels]})
    check_outputs({"--out": [args.out] if args.out else [], "--save-probs": [args.save_probs] if args.save_probs else []},
                  inputs)
    if args.show_preprocessed:
        check_output_folder("--show-preprocessed", args.show_preprocessed)


# ----------------------------------------------------------------------------- the draw-a-digit page (--demo)

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


def predict_one(source, name, *, ensemble, variants, device, precision, seed):
    """(probabilities [10], the uint8 [28, 28] image the model saw) for one image file or PIL image."""
    digit = preprocess_image(source, name=name)                                               # uint8 [28, 28]
    probs = ensemble_probabilities(ensemble, digit[None].to(device), variants, precision, seed)  # [1, 10]
    return probs[0].cpu(), digit


def page_answer(predict, source, name):
    """The page's outputs for one image: (digit -> probability, the 28x28 image, message); bad input is the message."""
    try:
        probs, digit = predict(source, name)
    except UserError as error:
        return None, None, f"**{error}**"
    return {str(d): float(p) for d, p in enumerate(probs)}, digit.numpy(), ""


def demo_page(gr, predict, title):
    """The page: a canvas and a photo upload in; the ten probabilities, the 28x28 input and any message out."""
    from PIL import Image
    brush = gr.Brush(default_size=CANVAS_SIZE // 20, colors=["#000000"], color_mode="fixed")  # a radius
    # With white paper to draw on, the canvas opens with the brush in hand (empty, it asks for a tool first).
    paper = {"background": Image.new("RGB", (CANVAS_SIZE, CANVAS_SIZE), "white"), "layers": [], "composite": None}
    with gr.Blocks(title="Draw a digit", analytics_enabled=False) as page:
        gr.Markdown(f"## Draw a digit\n{title}. Draw with the mouse, a finger or a pen, or upload a photo of a digit.")
        with gr.Row():
            with gr.Column(min_width=CANVAS_SIZE):
                canvas = gr.Sketchpad(paper, label="Draw a digit", type="pil", canvas_size=(CANVAS_SIZE, CANVAS_SIZE),
                                      brush=brush, layers=False, elem_id="canvas")
                clear = gr.ClearButton(value="Clear", elem_id="clear")
                # any file type: what is not an image gets read_greyscale's message, as with --images
                photo = gr.File(label="or upload a photo of one", type="filepath", elem_id="photo")
            with gr.Column(min_width=CANVAS_SIZE):
                seen = gr.Image(label="What the model saw (28x28)", format="png", interactive=False, buttons=["download"],
                                height=CANVAS_SIZE, elem_id="seen")
                message = gr.Markdown(elem_id="message")
            with gr.Column(min_width=CANVAS_SIZE):
                probabilities = gr.Label(num_top_classes=10, label="Predicted digit and probabilities",
                                         elem_id="probabilities")
        outputs = [probabilities, seen, message]
        clear.add([canvas, photo, *outputs])

        def read_drawing(value):
            if value is None or value["composite"] is None:  # a stroke has begun; its end sends the picture
                return gr.skip(), gr.skip(), gr.skip()
            return page_answer(predict, value["composite"], "the drawing")

        canvas.input(read_drawing, canvas, outputs, api_name="drawing", trigger_mode="always_last", show_progress="hidden")
        photo.upload(lambda path: page_answer(predict, path, Path(path).name), photo, outputs, api_name="photo")
    return page


def check_can_serve(host, port):
    """One line saying why, when host:port cannot be served on (Gradio would print a traceback)."""
    try:
        socket.create_server((host, port)).close()
    except OSError as error:  # the port is taken, or the address is not one of this machine's
        raise UserError(f"cannot serve on {host}:{port}: {error.strerror or error}; pick another --port or --host") from None


def serve_demo(args, variants, device, precision):
    """Serve the page until Ctrl-C; Gradio's uploads and served images live in a temporary folder removed at exit."""
    with tempfile.TemporaryDirectory(prefix="predict_tta-demo-") as folder:
        gr = import_gradio(folder)
        ensemble = load_ensemble(args.weights, device)
        title = f"{len(ensemble)} model(s) x {len(variants)} TTA variant(s)"
        predict = functools.partial(predict_one, ensemble=ensemble, variants=variants, device=device,
                                    precision=precision, seed=args.seed)
        page = demo_page(gr, predict, title)
        check_can_serve(args.host, args.port)
        _, url, _ = page.launch(server_name=args.host, server_port=args.port, share=False, run_history=False,
                                enable_monitoring=False, mcp_server=False, max_file_size=MAX_UPLOAD, css=PAGE_CSS,
                                quiet=True, prevent_thread_lock=True)
        print(f"draw a digit at {url} (Ctrl-C to stop)")
        page.block_thread()


def main(argv=None):
    args = parse_args(argv)
    variants = tta_variants(args.tta)
    device = pick_device(args.device)
    precision = pick_precision(args.precision, device)
    check_paths(args)
    if args.demo:
        return serve_demo(args, variants, device, precision)
    ensemble = load_ensemble(args.weights, device)
    if args.images:
        return predict_images(args, ensemble, variants, device, precision)
    images, labels = load_data(args, "test")
    passes = len(ensemble) * len(variants)
    print(f"{len(ensemble)} models x {len(variants)} TTA variants = {passes} forward passes per image, "
          f"{len(images)} images; device {device}, precision {precision}")

    start = time.perf_counter()
    probs = ensemble_probabilities(ensemble, images.to(device), variants, precision, args.seed, args.batch_size).cpu()
    seconds = time.perf_counter() - start
    predicted = probs.argmax(1)
    print(f"predicted in {seconds:.1f}s ({len(images) / seconds:.0f} images/s, {len(images) * passes / seconds:.0f} forward passes/s)")
    write_submission(args.out, predicted)
    print(f"wrote {args.out} ({len(predicted)} rows)")
    if args.save_probs:
        write_numpy(args.save_probs, probs.numpy())
        print(f"wrote {args.save_probs}")
    if labels is not None:
        errors = int((predicted != labels).sum())
        print(f"accuracy {1 - errors / len(labels):.4f} ({errors} errors in {len(labels)} images)")


if __name__ == "__main__":
    run_cli(main)

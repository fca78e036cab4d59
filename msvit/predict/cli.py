"""``msvit predict IMAGE|FOLDER|GLOB... [--checkpoint DIR|NAME | --model TIMM_NAME] [--out FILE]``:
the top-k classes of every image, with the tokens the gate gave it.

Images are read with PIL and preprocessed by ``msvit.eval_transform(model)`` (the model's input
size, crop, mean and std), so a row equals what ``model(transform(image))`` gives in Python. The
model is a checkpoint (a run or checkpoint folder, or a shipped name: default cluttered-digits) or
a timm ViT by name (``--model``: random weights unless ``--pretrained FILE``; no download).
A file that cannot be read is named on stderr and skipped; the others are still predicted, and
the command exits with status 1 at the end. ``--out FILE.csv|FILE.json`` writes one row per image
(``msvit.predict.results``); without it each image's result is printed.
"""

import argparse
import sys
import time
from typing import List

import torch

from msvit.predict import inputs, loading, results
from msvit.threads import add_threads_argument, use_threads

PROG = "msvit predict"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "images",
        nargs="+",
        metavar="IMAGE",
        help="image files, folders (searched recursively) or quoted globs ('photos/**/*.jpg')",
    )
    loading.add_model_options(p)
    p.add_argument("--top-k", type=int, default=5, help="classes per image (default 5, at most the model's classes)")
    p.add_argument("--batch-size", type=int, default=16, help="images per forward (default 16)")
    loading.add_run_options(
        p, "in [0, 1] (fixed tokens per image; default: the gate's own decisions)", "cpu, cuda or cuda:N (default cpu)"
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="run the packed forward captured (CUDA graphs) or "
        "compiled (torch.compile on CPU): msvit.compile_packed; pays off over many batches",
    )
    add_threads_argument(p)
    p.add_argument("--out", default=None, metavar="FILE", help="write the rows to FILE.csv or FILE.json")
    args = p.parse_args(argv)
    for flag, value in (("--top-k", args.top_k), ("--batch-size", args.batch_size)):
        if value is not None and value < 1:
            p.error(f"{flag} must be a positive integer, got {value}")
    if args.out is not None and not args.out.lower().endswith(results.FORMATS):
        p.error(f"--out {args.out}: the file name must end in .csv or .json (its format)")
    loading.check_run_options(p, args)
    loading.check_model_options(p, args)
    return args


def progress(total: int):
    """tqdm on a terminal (stderr), silent when piped; ``write`` prints without breaking the bar."""
    from tqdm import tqdm

    return tqdm(total=total, unit="img", disable=None, file=sys.stderr)


class Predictor:
    """Batches of preprocessed images -> (top-k indices, probabilities, tokens per image)."""

    def __init__(self, model, args, image_size):
        self.model, self.budget, self.top_k = model, args.budget, args.top_k
        self.runner = None
        if args.compile:
            from msvit.models.capture import compile_packed

            mode = "cuda_graphs" if args.device.type == "cuda" else "torch_compile"
            try:
                self.runner = compile_packed(model, args.batch_size, image_size, budget=args.budget, mode=mode)
            except (TypeError, ValueError) as error:  # a model compile_packed does not take (a Swin)
                raise SystemExit(f"{PROG}: --compile: {error}") from None

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor):
        if self.runner is None:
            output = self.model(images, budget=self.budget, return_gate=True)
            logits, tokens = output.logits, output.tokens
        else:  # the runner gives logits only: the tokens come from the gate's decisions again
            logits = self.runner(images)
            tokens = self.model.tokens_per_image(self.model.gate_mask(images, budget=self.budget), images=images)
        probabilities, indices = logits.float().softmax(-1).topk(self.top_k, dim=-1)
        return indices.cpu().tolist(), probabilities.cpu().tolist(), tokens.cpu().tolist()


def read_batch(paths: List[str], transform, bar, failed: List[str]):
    """(paths read, images [n, C, H, W]); files that fail are reported and added to ``failed``."""
    read, images = [], []
    for path in paths:
        try:
            images.append(transform(inputs.read_image(path)))
            read.append(path)
        except Exception as error:  # noqa: BLE001 - one bad file must not stop the others; named below
            message = (
                str(error)
                if isinstance(error, ValueError) and path in str(error)
                else (f"{path}: cannot preprocess this image ({type(error).__name__}: {error})")
            )
            bar.write(f"{PROG}: skipped {message}", file=sys.stderr)
            failed.append(path)
            bar.update(1)
    return read, (torch.stack(images) if images else None)


def model_rate(batches) -> str:
    """Images per second in the model, given (images, seconds) per batch. The first batch pays for
    lazy initialisation (and with --compile for compilation): it is left out when there are others."""
    first = batches[0][1]
    timed = batches[1:] or batches
    rate = sum(n for n, _ in timed) / max(sum(s for _, s in timed), 1e-9)
    if len(batches) == 1:
        return f"{rate:.1f} in the model, one batch, warm-up included"
    return f"{rate:.1f} in the model after the first batch, which took {first:.2f} s"


def main(argv=None) -> None:
    args = parse_args(argv)
    use_threads(args.threads)
    found = inputs.expand(args.images)
    for problem in found.problems:
        print(f"{PROG}: {problem}", file=sys.stderr)
    if not found.files:
        raise SystemExit(f"{PROG}: no image files to predict")
    model = loading.load_model(args, PROG, args.device)
    if args.top_k > model.num_classes:
        raise SystemExit(f"{PROG}: --top-k {args.top_k} is more than the model's {model.num_classes} classes")
    from msvit.data.transforms import eval_transform

    try:
        transform = eval_transform(model)
    except ValueError as error:  # a checkpoint that records no input size, mean or std
        raise SystemExit(f"{PROG}: cannot preprocess images for this model: {error}") from None
    predictor = Predictor(model, args, tuple(model.pretrained_cfg["input_size"][1:]))
    names = loading.label_names(model)
    predictions, failed, model_seconds = [], [], []  # model seconds per batch
    start = time.perf_counter()
    with progress(len(found.files)) as bar:
        for first in range(0, len(found.files), args.batch_size):
            paths, images = read_batch(found.files[first : first + args.batch_size], transform, bar, failed)
            if images is None:
                continue
            tick = time.perf_counter()
            indices, probabilities, tokens = predictor(images.to(args.device))
            model_seconds.append((len(paths), time.perf_counter() - tick))
            for row in zip(paths, tokens, indices, probabilities):
                predictions.append(results.Prediction(*row))
                if args.out is None:
                    bar.write(results.line(predictions[-1], names))
            bar.update(len(paths))
    seconds = time.perf_counter() - start
    if args.out is not None:
        results.write(args.out, predictions, names, args.top_k)
    if predictions:
        mean_tokens = sum(p.tokens for p in predictions) / len(predictions)
        print(
            f"{len(predictions)} images in {seconds:.2f} s: {len(predictions) / seconds:.1f} images/s "
            f"({model_rate(model_seconds)}), mean {mean_tokens:.1f} tokens per image"
            + (f"; wrote {args.out}" if args.out else "")
        )
    bad = len(failed) + len(found.problems)
    if bad:
        raise SystemExit(f"{PROG}: {bad} input(s) could not be predicted (named above)")


if __name__ == "__main__":
    main()

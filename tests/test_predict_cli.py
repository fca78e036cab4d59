"""``msvit predict``: rows equal to the Python path (``model(eval_transform(model)(image))``) on real
images, CSV and JSON content, files that cannot be read, folders, globs and bad flags."""

import csv
import json
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import skimage.data
import skimage.io
import timm
import torch
from PIL import Image
from safetensors.torch import save_file

import msvit
from msvit.cli import main as cli_main
from msvit.data.digits import ClutteredDigits

from helpers import redraw_parameters

ROOT = Path(__file__).resolve().parents[1]
PHOTOS = ("coffee", "chelsea", "astronaut")  # bundled with scikit-image (msvit/data/sample_images.py)


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """digits/ (PNG renders of the cluttered digits the shipped model knows), photos/ (JPEG and PNG
    photos of other sizes), photos/grey/ (a greyscale one, nested) and a README a folder search skips."""
    root = tmp_path_factory.mktemp("images")
    (root / "digits").mkdir()
    digits = ClutteredDigits(4, 64, seed=3, split="val", digit_scale=(0.15, 0.3))
    for i in range(4):
        pixels = (digits[i][0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        skimage.io.imsave(root / "digits" / f"digit_{i}.png", pixels, check_contrast=False)
    (root / "photos" / "grey").mkdir(parents=True)
    Image.fromarray(skimage.data.coffee()).save(root / "photos" / "coffee.jpg", quality=95)
    skimage.io.imsave(root / "photos" / "chelsea.png", skimage.data.chelsea())
    Image.fromarray(skimage.data.astronaut()).save(root / "photos" / "astronaut.jpg", quality=95)
    skimage.io.imsave(root / "photos" / "grey" / "camera.png", skimage.data.camera())
    (root / "photos" / "README.txt").write_text("not an image\n")
    return root


def python_path(model, paths, budget=None):
    """(top-5 indices, top-5 probabilities, tokens) of the Python recipe the docs give."""
    transform = msvit.eval_transform(model)
    images = torch.stack([transform(Image.open(p)) for p in paths])
    with torch.no_grad():
        output = model(images, budget=budget, return_gate=True)
    probabilities, indices = output.logits.softmax(-1).topk(5, dim=-1)
    return indices.tolist(), probabilities.tolist(), output.tokens.tolist()


def read_json(path):
    return json.loads(Path(path).read_text())


def test_shipped_model_rows_equal_the_python_path_on_a_folder(image_folder, tmp_path, capsys):
    out = tmp_path / "rows.json"
    cli_main(
        [
            "predict",
            str(image_folder / "digits"),
            "--checkpoint",
            "cluttered-digits",
            "--out",
            str(out),
            "--batch-size",
            "3",
        ]
    )
    rows = read_json(out)
    paths = sorted(str(p) for p in (image_folder / "digits").glob("*.png"))
    assert [r["path"] for r in rows] == paths
    indices, probabilities, tokens = python_path(msvit.load_pretrained("cluttered-digits"), paths)
    assert [r["indices"] for r in rows] == indices
    assert [r["labels"] for r in rows] == [[str(i) for i in row] for row in indices]  # its classes are "0".."9"
    assert np.allclose([r["probabilities"] for r in rows], probabilities, atol=2e-6)
    assert [r["tokens"] for r in rows] == tokens
    assert len(set(tokens)) > 1, "the gate should give these digits different token counts"
    closing = capsys.readouterr().out.strip().splitlines()[-1]
    assert "4 images in" in closing and "images/s (" in closing and "in the model after the first batch" in closing
    assert f"mean {sum(tokens) / 4:.1f} tokens per image" in closing


def test_timm_model_with_local_weights_and_a_budget_equals_the_python_path(image_folder, tmp_path):
    vit = redraw_parameters(timm.create_model("vit_tiny_patch16_224", pretrained=False))
    weights = tmp_path / "vit_tiny.safetensors"
    save_file(vit.state_dict(), str(weights))
    out = tmp_path / "rows.csv"
    cli_main(
        [
            "predict",
            str(image_folder / "photos"),
            "--model",
            "vit_tiny_patch16_224",
            "--pretrained",
            str(weights),
            "--budget",
            "0.25",
            "--top-k",
            "5",
            "--out",
            str(out),
        ]
    )
    with open(out) as f:
        rows = list(csv.DictReader(f))
    paths = [r["path"] for r in rows]
    assert paths == sorted(str(p) for p in (image_folder / "photos").rglob("*.[jp][pn]g"))  # README skipped
    model = msvit.from_timm(vit, gate="entropy")
    indices, probabilities, tokens = python_path(model, paths, budget=0.25)
    names = timm.data.ImageNetInfo("imagenet-1k")
    for row, top, probs, n in zip(rows, indices, probabilities, tokens):
        assert row["label_1"] == names.index_to_description(top[0])  # top-1 equal, by ImageNet name
        assert [row[f"label_{k}"] for k in range(1, 6)] == [names.index_to_description(i) for i in top]
        assert np.allclose([float(row[f"probability_{k}"]) for k in range(1, 6)], probs, atol=2e-6)
        assert int(row["tokens"]) == n == 1 + 49 + 3 * 12  # cls + 49 regions, 12 of them (25%) fine


def test_csv_has_one_row_per_image_with_k_ranked_labels(image_folder, tmp_path):
    out = tmp_path / "rows.csv"
    cli_main(["predict", str(image_folder / "digits"), "--top-k", "3", "--out", str(out)])
    lines = out.read_text().splitlines()
    assert lines[0] == "path,tokens,label_1,probability_1,label_2,probability_2,label_3,probability_3"
    assert len(lines) == 5
    for row in csv.DictReader(lines):
        probabilities = [float(row[f"probability_{k}"]) for k in (1, 2, 3)]
        assert probabilities == sorted(probabilities, reverse=True) and sum(probabilities) <= 1 + 1e-5
        assert len({row["label_1"], row["label_2"], row["label_3"]}) == 3 and int(row["tokens"]) >= 17


def test_a_broken_file_is_named_the_others_are_predicted_and_the_exit_code_is_not_zero(image_folder, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"cut short")
    text = tmp_path / "notes.jpg"
    text.write_text("a text file with an image's name")
    good = sorted(str(p) for p in (image_folder / "digits").glob("*.png"))[:2]
    out = tmp_path / "rows.json"
    done = subprocess.run(
        [sys.executable, "-m", "msvit", "predict", good[0], str(broken), str(text), good[1], "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 1, done.stderr
    assert f"skipped {broken}: " in done.stderr and f"skipped {text}: not an image file" in done.stderr
    assert "2 input(s) could not be predicted" in done.stderr
    assert [r["path"] for r in read_json(out)] == good


def test_globs_and_folders_expand_and_a_glob_matching_nothing_fails(image_folder, tmp_path, capsys):
    out = tmp_path / "rows.json"
    cli_main(
        [
            "predict",
            str(image_folder / "photos" / "**" / "*.png"),
            str(image_folder / "digits" / "digit_[01].png"),
            "--out",
            str(out),
        ]
    )
    assert [Path(r["path"]).name for r in read_json(out)] == ["chelsea.png", "camera.png", "digit_0.png", "digit_1.png"]
    with pytest.raises(SystemExit, match="1 input"):
        cli_main(["predict", str(image_folder / "digits"), str(image_folder / "nothing_*.png"), "--out", str(out)])
    assert "nothing_*.png: no file matches this pattern" in capsys.readouterr().err
    assert len(read_json(out)) == 4  # the folder's images were still predicted


def test_without_out_every_image_is_printed_and_threads_are_set(image_folder, capsys):
    threads = torch.get_num_threads()
    try:
        cli_main(["predict", str(image_folder / "digits" / "digit_0.png"), "--top-k", "2", "--threads", "1"])
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith(f"{image_folder / 'digits' / 'digit_0.png'}: ") and first.endswith("tokens)")


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--top-k", "0"], "--top-k must be a positive integer"),
        (["--batch-size", "-1"], "--batch-size must be a positive integer"),
        (["--threads", "0"], "argument --threads: expected a whole number of threads >= 1"),
        (["--budget", "1.5"], "--budget is a fraction"),
        (["--budget", "nan"], "--budget is a fraction"),
        (["--out", "rows.txt"], "must end in .csv or .json"),
        (["--device", "gpu0"], "--device gpu0: not a device"),
        (["--checkpoint", "cluttered-digits", "--model", "vit_tiny_patch16_224"], "one of --checkpoint and --model"),
        (["--entropy-threshold", "5"], "--entropy-threshold builds a model with --model"),
        (["--gate", "learned"], "--gate builds a model with --model"),
        (["--model", "vit_nonexistent_model"], "timm has no model of that name"),
        (["--model", "vit_tiny_patch16_224", "--pretrained", "missing.pth"], "--pretrained missing.pth: no such file"),
        (["--model", "vit_tiny_patch16_224", "--scales", "16", "24"], "--scales must list"),
        (["--model", "vit_tiny_patch16_224", "--gate", "learned", "--entropy-threshold", "5"], "applies to --gate"),
    ],
)
def test_bad_flags_are_refused_by_name(image_folder, flags, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli_main(["predict", str(image_folder / "digits"), *flags])
    assert exit_.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--checkpoint", "no-such-model"], "no such folder, and no shipped model of that name (shipped: cluttered"),
        (["--top-k", "11"], "--top-k 11 is more than the model's 10 classes"),
    ],
)
def test_a_model_that_cannot_serve_the_flags_is_refused_by_name(image_folder, flags, message):
    with pytest.raises(SystemExit, match=message.replace("(", r"\(")):
        cli_main(["predict", str(image_folder / "digits"), *flags])


def test_no_image_at_all_is_an_error(tmp_path, capsys):
    with pytest.raises(SystemExit, match="no image files to predict"):
        cli_main(["predict", str(tmp_path / "missing.png")])
    assert "missing.png: no such file or folder" in capsys.readouterr().err


def documented_commands(command: str):
    """The arguments after ``msvit <command>`` on the command lines of docs/deploy.md."""
    for line in (ROOT / "docs" / "deploy.md").read_text().splitlines():
        if line.startswith(f"msvit {command} "):
            yield shlex.split(line.split("#")[0])[2:]


@pytest.mark.parametrize(
    "command, argv", [(c, a) for c in ("predict", "export") for a in documented_commands(c)], ids=" ".join
)
def test_the_documented_commands_parse(command, argv):
    module = {"predict": "msvit.predict.cli", "export": "msvit.predict.export_cli"}[command]
    args = __import__(module, fromlist=["parse_args"]).parse_args(argv)
    assert args.images if command == "predict" else args.out.endswith(".pt2")


def test_the_deploy_page_shows_both_commands():
    assert len(list(documented_commands("predict"))) >= 3 and len(list(documented_commands("export"))) >= 1

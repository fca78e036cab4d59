"""Every numeric flag of msvit train is range-checked at parse time; file flags name flag and file."""

import pytest
from test_train import small_run

import msvit
from msvit.train import parse_args, train


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--gate-lr", "-1"], "--gate-lr must be >= 0"),
        (["--gate-lambda", "-4"], "--gate-lambda must be >= 0"),
        (["--epochs", "0"], "--epochs must be >= 1"),
        (["--max-steps", "-1"], "--max-steps must be >= 0"),
        (["--gate-hidden", "0"], "--gate-hidden must be >= 1"),
        (["--lr", "nan"], "--lr must be >= 0"),
        (["--lr", "-0.001"], "--lr must be >= 0"),
        (["--warmup-epochs", "inf"], "--warmup-epochs must be >= 0"),
        (["--batch-size", "0"], "--batch-size must be >= 1"),
        (["--image-size", "-32"], "--image-size must be >= 1"),
        (["--momentum", "1"], r"--momentum must be in \[0, 1\)"),
        (["--smoothing", "-0.1"], r"--smoothing must be in \[0, 1\)"),
        (["--gbas-sigma", "0"], "--gbas-sigma must be > 0"),
        (["--gate-init-logit", "nan"], "--gate-init-logit must be finite"),
        (["--digit-scale", "0.5", "0.2"], "--digit-scale LO HI needs LO <= HI"),
        (["--digit-scale", "0", "0.2"], r"--digit-scale must be in \(0, 1\]"),
        (["--gate-target", "1"], r"--gate-target must be in \(0, 1\)"),
        (["--shift", "-2"], "--shift must be >= 0"),
        (["--model-kwargs", "{'depth': 2}"], "--model-kwargs is not valid JSON"),
        (["--model-kwargs", "[2]"], "--model-kwargs must be a JSON object"),
        (["--pretrained", "/nowhere/vit.safetensors"], "--pretrained /nowhere/vit.safetensors: no such file"),
        (["--model", "resnet18"], "--model resnet18: from_timm expects a timm VisionTransformer"),
        (["--model", "vit_nowhere"], "--model vit_nowhere: timm has no model of that name"),
        (["--model-kwargs", '{"depth": "2"}'], "--model-kwargs: 'depth' must be an integer"),
        # the flags of the other gate (tests/test_entropy_gate.py trains with the entropy gate)
        (["--gate", "entropy", "--gate-loss", "l0"], "--gate-loss acts on the learned gate; with --gate entropy"),
        (["--gate", "entropy", "--gate-lambda", "4"], "--gate-lambda acts on the learned gate"),  # the default, typed
        (["--gate", "entropy", "--gate-hidden", "8"], "--gate-hidden acts on the learned gate"),
        (["--gate", "entropy", "--gate-start-epoch", "2"], "--gate-start-epoch acts on the learned gate"),
        (["--entropy-threshold", "4"], "--entropy-threshold applies to --gate entropy"),
        (["--entropy-bins", "256"], "--entropy-bins applies to --gate entropy"),
        (["--gate", "entropy", "--entropy-bins", "500"], "--entropy-bins: invalid choice: 500"),
        (["--gate", "entropy", "--entropy-threshold", "nan"], "--entropy-threshold must be finite"),
        (["--gate", "random"], "--gate: invalid choice: 'random'"),
        (
            ["--gate", "entropy", "--model", "swin_tiny_patch4_window7_224"],
            "--model swin_tiny_patch4_window7_224 (a Swin) takes --gate learned",
        ),
    ],
)
def test_bad_flags_are_refused_naming_the_flag(capsys, flags, message):
    with pytest.raises(SystemExit) as stop:
        parse_args(flags)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert message.replace("\\", "") in err, err


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--decoder-heads", "0"], "--decoder-heads must be >= 1"),
        (["--budget", "1.5"], r"--budget must be in [0, 1]"),
        (["--init", "/nowhere"], "--init /nowhere: no such folder"),
        (["--gate", "entropy", "--no-freeze-gate"], "the entropy gate (--gate entropy) has nothing to train"),
        (["--gate", "entropy", "--init", "runs/x"], "--gate builds a backbone, but --init"),
    ],
)
def test_bad_segmentation_flags_are_refused(capsys, flags, message):
    with pytest.raises(SystemExit):
        parse_args(["--task", "segmentation", *flags])
    assert message in capsys.readouterr().err


def test_a_pretrained_file_that_is_not_weights_names_flag_and_file(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("not weights\n")
    with pytest.raises(SystemExit, match=f"--pretrained {text}: cannot load it"):
        train(small_run(tmp_path / "run", "--pretrained", str(text), "--epochs", "1"))


def test_a_batch_larger_than_the_training_set_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="--batch-size 512 is larger than the training set .256 images"):
        train(small_run(tmp_path, "--batch-size", "512", "--epochs", "1"))


@pytest.mark.parametrize("option", [{"temperature": 0}, {"temperature": float("nan")}, {"hidden": 0}])
def test_from_timm_refuses_a_degenerate_gate(option):
    with pytest.raises(ValueError, match="gate (temperature|hidden)"):
        msvit.from_timm("vit_tiny_patch16_224", timm_kwargs={"img_size": 32, "depth": 1}, **option)


def option_helps(text: str) -> dict:
    """{invocation: help text} of every option an argparse help lists (wrapped lines joined)."""
    helps, current = {}, None
    for line in text.splitlines():
        if line.startswith("  -"):
            current, _, first = line.strip().partition("  ")
            helps[current] = first.strip()
        elif current and line.startswith("   ") and line.strip():
            helps[current] += " " + line.strip()
        else:
            current = None
    return helps


@pytest.mark.parametrize("task", ["classification", "segmentation"])
def test_every_option_in_the_help_has_a_help_text_and_one_default(task):
    from msvit.train.options import build_parser

    parser = build_parser(task)
    helps = option_helps(parser.format_help())
    assert len(helps) == sum(bool(a.option_strings) for a in parser._actions)
    helps.pop("-h, --help")
    for option, text in helps.items():
        assert text and text.lower().count("default") == 1, f"{option}: {text!r}"

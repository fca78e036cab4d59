"""``msvit export --out MODEL.pt2 [--checkpoint DIR|NAME | --model TIMM_NAME] --batch-size N``: the
model's static packed forward as an AOTInductor package (``msvit.export``), which runs without
msvit: ``torch._inductor.aoti_load_package("MODEL.pt2")(images)`` gives the logits for a batch of
exactly N images of the exported size (normalised as the model expects: the mean and std are in
the package's metadata, ``msvit_input``)."""

import argparse
import time

from msvit.predict import loading

PROG = "msvit export"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, metavar="FILE.pt2", help="the package to write")
    loading.add_model_options(p)
    p.add_argument("--batch-size", type=int, default=1, help="images per call of the package (default 1)")
    p.add_argument(
        "--image-size",
        type=int,
        nargs="+",
        default=None,
        metavar="PX",
        help="H or H W (default: the model's input size)",
    )
    loading.add_run_options(
        p,
        "in [0, 1]: fixed tokens, the fast package (default: the gate decides, rows padded to all-fine)",
        "where the package runs: cpu, cuda or cuda:N (default cpu)",
    )
    p.add_argument(
        "--kernels",
        choices=("reference", "triton"),
        default="reference",
        help="what the package runs: 'reference', the torch path Inductor compiles (any device), or "
        "'triton', this package's fused Triton kernels (--device cuda; docs/deploy.md)",
    )
    args = p.parse_args(argv)
    if args.kernels == "triton" and not str(args.device).startswith("cuda"):
        p.error(f"--kernels triton packages the CUDA kernels: add --device cuda (got --device {args.device})")
    if not args.out.endswith(".pt2"):
        p.error(f"--out {args.out}: an AOTInductor package is a .pt2 file")
    if args.batch_size < 1:
        p.error(f"--batch-size must be a positive integer, got {args.batch_size}")
    if args.image_size is not None and (len(args.image_size) > 2 or min(args.image_size) < 1):
        p.error(f"--image-size takes H or H W in pixels, got {' '.join(map(str, args.image_size))}")
    loading.check_run_options(p, args)
    loading.check_model_options(p, args)
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    model = loading.load_model(args, PROG, args.device)
    recorded = (getattr(model, "pretrained_cfg", None) or {}).get("input_size")
    if args.image_size is None and not recorded:
        raise SystemExit(f"{PROG}: this model records no input size: pass --image-size H [W]")
    size = args.image_size or list(recorded[1:])
    size = (size[0], size[-1])
    from msvit.models.export import export

    start = time.perf_counter()
    try:
        path = export(model, args.out, args.batch_size, size, budget=args.budget, kernels=args.kernels)
    except (TypeError, ValueError) as error:  # a model export does not take (a Swin), a bad budget
        raise SystemExit(f"{PROG}: {error}") from None
    budget = "the gate decides" if args.budget is None else f"budget {args.budget:g}"
    print(
        f"wrote {path} in {time.perf_counter() - start:.0f} s: input [{args.batch_size}, {model.in_chans}, "
        f"{size[0]}, {size[1]}] {next(model.parameters()).dtype} on {args.device}, {budget}, {args.kernels} kernels"
    )


if __name__ == "__main__":
    main()

"""Learned gate vs entropy gate (APT) vs random regions on one backbone: the shipped cluttered-digits
model, top-1 on its held-out digits at matched tokens per image.

    python bench/gate_comparison.py [--images 2000] [--seeds 5] [--entropy-run DIR] [--record | --out FILE.md]

The backbone is ``msvit.load_pretrained("cluttered-digits")``, trained with its learned gate
(docs/training.md, "The shipped cluttered-digits model"); only the gate changes. At a budget of k fine regions
per image (of 16; 1 + 16 + 3k tokens, the same for every gate and image) each gate keeps the k
regions it ranks highest: the learned gate its logits, the entropy gate the grey-level entropies of
the un-normalised pixels (the model's ``pretrained_cfg`` mean and std undone; 512 bins), random
gates k regions drawn uniformly (``--seeds`` draws: mean and standard deviation). A second table
runs each gate's own rule (a logit above 0; an entropy above a threshold), where tokens vary per
image. The held-out set is the training run's (val split, its seed + 1 and digit scale, rendered
at 64 px as training rendered it), so the learned gate's own rule reproduces its metrics.jsonl
top-1. ``--entropy-run DIR``: the same tables for a run trained with ``msvit train --gate entropy``
on the same data. About three minutes on 2 CPU cores (four with ``--entropy-run``). Writes
bench/results-local/gate_comparison.md; ``--record`` the committed bench/results/gate_comparison.md.
"""

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

import msvit
from msvit.data import normalize
from msvit.data.digits import ClutteredDigits
from msvit.data.loaders import materialize
from msvit.models.entropy_gate import APT_THRESHOLD, EntropyGate
from msvit.models.gate import budget_mask
from msvit.threads import add_threads_argument, use_threads
from msvit.train.evaluate import evaluate

sys.path.insert(0, str(Path(__file__).resolve().parent))  # results_io is a module of bench/
from results_io import add_output_arguments, output_file  # noqa: E402

BUDGETS = (0, 1, 2, 4, 8, 16)  # fine regions per image, of 16: 0%, 6%, 12.5%, 25%, 50%, 100%


def held_out(model, images: int):
    """The training run's own held-out digits (``msvit.data.loaders.build_data``'s val split)."""
    data = model.pretrained_cfg["data"]
    digits = ClutteredDigits(
        images, tuple(data["image_size"]), seed=data["seed"] + 1, split="val", digit_scale=tuple(data["digit_scale"])
    )
    return materialize(digits, "held-out digits", show=False)


def random_regions(k: int, regions: int, seed: int):
    """``decide`` for ``evaluate``: k of ``regions`` per image drawn uniformly, a fixed draw per seed."""
    generator = torch.Generator().manual_seed(seed)
    return lambda images: budget_mask(torch.rand(len(images), regions, generator=generator), k)


def spread(values, scale: float = 1.0, digits: int = 2) -> str:
    """One value, or the mean ± standard deviation of several, times ``scale``."""
    values = torch.tensor(values, dtype=torch.float64) * scale
    return f"{values.mean():.{digits}f}" + (f" ± {values.std():.{digits}f}" if len(values) > 1 else "")


def top1(*metrics) -> str:
    return spread([m["top1"] for m in metrics], 100, 1)


class Bench:
    """One backbone on the held-out digits: ``evaluate`` with any gate's decisions."""

    def __init__(self, model, val, seeds: int, started: float):
        self.model, self.val, self.seeds, self.started = model, val, seeds, started
        self.mean, self.std = model.pretrained_cfg["mean"], model.pretrained_cfg["std"]
        self.loader = DataLoader(val, batch_size=500)
        self.regions = model.gate.grid[0] * model.gate.grid[1]

    def run(self, decide=None) -> dict:
        return evaluate(self.model, self.loader, self.mean, self.std, "cpu", boxes=self.val.boxes, decide=decide)

    def entropy_gate(self, threshold: float = APT_THRESHOLD) -> EntropyGate:
        gate = self.model.gate
        return EntropyGate(gate.region_size, gate.grid, (threshold,), mean=self.mean, std=self.std)

    def budget_table(self, gates: dict) -> list:
        """Markdown rows: per budget k, top-1 and the on-digit ratio of every gate in ``gates``
        (name -> ``gate`` with ``decide(images, budget=k)``) and of random regions."""
        names = [*gates, "random"]
        lines = [
            "| fine regions k | tokens / image | "
            + " | ".join(f"top-1 {n}" for n in names)
            + " | "
            + " | ".join(f"on-digit {n}" for n in names)
            + " |",
            "|---|---|" + "---|" * 2 * len(names),
        ]
        for k in BUDGETS:
            if k in (0, self.regions):  # all coarse, all fine: every gate's mask is the same, measured once
                same = [self.run(lambda images: torch.full((len(images), self.regions), bool(k)))]
                results = [same] * len(names)
            else:
                results = [
                    [self.run(lambda images, g=g: g.decide(images, sample=False, budget=k).hard)]
                    for g in gates.values()
                ]
                results.append([self.run(random_regions(k, self.regions, seed)) for seed in range(self.seeds)])
            on_digit = [spread([m["fine_digit_ratio"] for m in ms]) if k else "-" for ms in results]
            lines.append(
                f"| {k} ({k / self.regions:.0%}) | {results[0][0]['tokens_per_image']:.0f} | "
                + " | ".join(top1(*ms) for ms in results)
                + " | "
                + " | ".join(on_digit)
                + " |"
            )
            print(lines[-1], f"({time.perf_counter() - self.started:.0f} s)", flush=True)
        return lines

    def rule_table(self, rules: dict) -> list:
        """Markdown rows: each gate's own rule (name -> ``decide`` for ``evaluate``, None: the model's gate)."""
        lines = ["| gate | mean tokens / image | fine rate | top-1 | on-digit |", "|---|---|---|---|---|"]
        for name, decide in rules.items():
            m = self.run(decide)
            lines.append(
                f"| {name} | {m['tokens_per_image']:.1f} | {m['fine_rate']:.4f} | {top1(m)} "
                f"| {m['fine_digit_ratio']:.2f} |"
            )
            print(lines[-1], flush=True)
        return lines


def hard(gate):
    """``decide`` for ``evaluate``: the gate's own rule."""
    return lambda images: gate.decide(images, sample=False).hard


def shipped_tables(bench: Bench) -> list:
    """The shipped model with its learned gate, the entropy gate and random regions."""
    entropy = bench.entropy_gate()
    lines = bench.budget_table({"learned": bench.model.gate, "entropy": entropy})
    own = bench.run()
    images = normalize(bench.val.images.float() / 255, bench.mean, bench.std)
    entropies = entropy.entropy(images).flatten()
    matched = entropies.quantile(1 - own["fine_rate"]).item()  # the learned gate's mean fine rate
    lines += [
        "",
        "## Each gate's own rule (tokens per image vary by image)",
        "",
        f"The learned gate keeps a region fine where its logit is above 0; the entropy gate where the "
        f"entropy is above tau: APT's {APT_THRESHOLD} bits, and the tau at which it keeps as many regions "
        "fine over this set as the learned gate (chosen on these images, no labels). Held-out region "
        f"entropies: median {entropies.median():.2f}, 90th percentile {entropies.quantile(0.9):.2f}, "
        f"max {entropies.max():.2f} bits.",
        "",
    ]
    lines += bench.rule_table(
        {
            "learned (logit > 0)": None,
            f"entropy > {APT_THRESHOLD} (APT)": hard(entropy),
            f"entropy > {matched:.2f} (the learned gate's fine rate)": hard(bench.entropy_gate(matched)),
        }
    )
    error = (own["top1"] * (1 - own["top1"]) / len(bench.val)) ** 0.5 * 100
    return lines + [
        "",
        f"Sampling error: one top-1 near {own['top1']:.0%} on {len(bench.val)} images has a binomial standard "
        f"error of {error:.1f} points; the gates are compared on the same images, so smaller gaps between "
        "them may be real but are not established by this set.",
    ]


def entropy_run_tables(bench: Bench, run: str) -> list:
    """A backbone trained behind the entropy gate: that gate at the budgets and its threshold, random regions."""
    from msvit.train.options import build_parser
    from msvit.train.run_folder import read_checkpoint_state

    flags = read_checkpoint_state(Path(run), "cpu").state["args"]
    defaults = build_parser(flags["task"])
    typed = ", ".join(f"{k}={v!r}" for k, v in flags.items() if v != defaults.get_default(k))
    gate = bench.model.gate
    lines = [
        "",
        f"## A backbone trained behind the entropy gate ({run})",
        "",
        f"`msvit train` with these flags (the run's recorded flags that differ from the defaults): {typed}. "
        f"Its gate: entropy > {gate.thresholds[0]} bits, {gate.bins} bins, in training and here. Same "
        "held-out digits, same budgets.",
        "",
    ]
    lines += bench.budget_table({"entropy": gate})
    return lines + [""] + bench.rule_table({f"entropy > {gate.thresholds[0]} (its training rule)": None})


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=2000, help="held-out images (default: %(default)s, the run's)")
    parser.add_argument("--seeds", type=int, default=5, help="random draws per budget (default: %(default)s)")
    parser.add_argument(
        "--entropy-run", default=None, help="a run of msvit train --gate entropy on the digits (default: none)"
    )
    add_output_arguments(parser, "gate_comparison.md")
    add_threads_argument(parser)
    args = parser.parse_args(argv)
    try:
        out = output_file("gate_comparison.md", args.record, args.out)
    except ValueError as error:
        parser.error(str(error))
    use_threads(args.threads)
    command = " ".join(["python bench/gate_comparison.py", *(sys.argv[1:] if argv is None else argv)])
    started = time.perf_counter()
    torch.manual_seed(0)
    model = msvit.load_pretrained("cluttered-digits")
    bench = Bench(model, held_out(model, args.images), args.seeds, started)
    lines = [
        "# Learned gate vs entropy gate vs random regions (shipped cluttered-digits model)",
        "",
        f'`{command}`. One backbone, `msvit.load_pretrained("cluttered-digits")` (trained with its learned '
        f"gate, weights sha256 {model.pretrained_cfg['config']['weights_sha256'][:12]}...), on its training "
        f"run's {len(bench.val)} held-out digits; only the gate changes. The entropy gate undoes the model's "
        f"normalisation (mean {tuple(bench.mean)}, std {tuple(bench.std)}) and bins grey levels into 512 bins "
        f"(APT). torch {torch.__version__}.",
        "",
        "## Matched budget: k of 16 regions fine in every image (each gate keeps its k highest-ranked)",
        "",
        "Top-1 (%), and the share of fine regions on the digit's box divided by the share of all regions "
        f"on it (1: no preference). Random: {args.seeds} draws, mean ± standard deviation. At k = 0 "
        "and 16 every gate gives the same mask (all coarse, all fine), measured once.",
        "",
        *shipped_tables(bench),
    ]
    if args.entropy_run:
        trained = msvit.load_checkpoint(args.entropy_run)
        if not isinstance(trained.gate, EntropyGate) or trained.pretrained_cfg["data"] != model.pretrained_cfg["data"]:
            parser.error(f"--entropy-run {args.entropy_run}: not an entropy-gate run on the shipped model's data")
        lines += entropy_run_tables(Bench(trained, bench.val, args.seeds, started), args.entropy_run)
    lines += ["", f"Run time {time.perf_counter() - started:.0f} s.", ""]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    print(f"wrote {out}" + ("" if args.record else " (not the committed bench/results/: --record writes that)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())

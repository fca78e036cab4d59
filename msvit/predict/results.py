"""``msvit predict``'s rows: one per image, written as CSV or JSON (by the file's extension).

A row holds the path as it was given (or found in a folder), the tokens the image got in the packed
forward (prefix included) and the top-k classes, best first, with their probabilities: CSV columns
``path, tokens, label_1, probability_1, ..., label_k, probability_k``; JSON a list of objects
``{"path", "tokens", "labels", "indices", "probabilities"}``. Labels are the model's class names
when it has them, else the class indices.
"""

import csv
import io
import json
from pathlib import Path
from typing import List, NamedTuple, Optional

from msvit.io.atomic import write_text

FORMATS = (".csv", ".json")


class Prediction(NamedTuple):
    path: str
    tokens: int
    indices: List[int]
    probabilities: List[float]


def labels(prediction: Prediction, names: Optional[List[str]]) -> List[str]:
    return [names[i] if names else str(i) for i in prediction.indices]


def to_csv(predictions: List[Prediction], names: Optional[List[str]], top_k: int) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    ranks = range(1, top_k + 1)
    writer.writerow(["path", "tokens", *(f"{field}_{r}" for r in ranks for field in ("label", "probability"))])
    for p in predictions:
        pairs = [v for pair in zip(labels(p, names), p.probabilities) for v in (pair[0], f"{pair[1]:.6f}")]
        writer.writerow([p.path, p.tokens, *pairs])
    return out.getvalue()


def to_json(predictions: List[Prediction], names: Optional[List[str]]) -> str:
    rows = [
        {
            "path": p.path,
            "tokens": p.tokens,
            "labels": labels(p, names),
            "indices": p.indices,
            "probabilities": [round(v, 6) for v in p.probabilities],
        }
        for p in predictions
    ]
    return json.dumps(rows, indent=1) + "\n"


def write(path, predictions: List[Prediction], names: Optional[List[str]], top_k: int) -> None:
    path = Path(path)
    text = to_csv(predictions, names, top_k) if path.suffix.lower() == ".csv" else to_json(predictions, names)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, text)


def line(prediction: Prediction, names: Optional[List[str]]) -> str:
    """One image's result for the terminal (no ``--out``)."""
    best = ", ".join(f"{label} {p:.3f}" for label, p in zip(labels(prediction, names), prediction.probabilities))
    return f"{prediction.path}: {best} ({prediction.tokens} tokens)"

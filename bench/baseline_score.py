"""The scoring baseline: one image at a time, as a simple script would score.

Loads the model with ``imgtrain.load_trained_model``, then for each image: decode with PIL, resize to the
model's input size, normalise with the model's statistics, forward a batch of one, softmax. Writes the
probabilities and predicted label of every image to a CSV, like score-image-model.

    python bench/baseline_score.py --trained-model M --dataset IMAGE_DIRECTORY --output scores.csv --json r.json
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

import torch
from PIL import Image
from torchvision.transforms.functional import pil_to_tensor

from imgtrain import load_trained_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trained-model", type=Path, required=True)
    parser.add_argument("--dataset", type=Path, required=True, help="an ImageDirectory")
    parser.add_argument("--output", type=Path, required=True, help="the CSV to write")
    parser.add_argument("--json", type=Path, required=True, help="where to write the timings")
    args = parser.parse_args()

    trained = load_trained_model(args.trained_model)
    model, spec = trained.network, trained.spec
    size = spec.input.image_size
    mean = torch.tensor(spec.input.mean).view(3, 1, 1)
    std = torch.tensor(spec.input.std).view(3, 1, 1)
    names = [json.loads(line)["image_info"]["file_name"]
             for line in (args.dataset / "images.lst").read_text(encoding="utf-8").splitlines() if line.strip()]
    started = time.perf_counter()
    with open(args.output, "w", newline="", encoding="utf-8") as out, torch.inference_mode():
        writer = csv.writer(out)
        writer.writerow(["image", *(f"Scored Probabilities_{label}" for label in spec.labels), "Scored Labels"])
        for name in names:
            with Image.open(args.dataset / name) as im:
                rgb = im.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
            x = (pil_to_tensor(rgb).float() / 255 - mean) / std
            probs = model(x[None]).softmax(dim=1)[0]
            writer.writerow([name, *(f"{p:.6g}" for p in probs.tolist()), spec.labels[int(probs.argmax())]])
    seconds = time.perf_counter() - started
    args.json.write_text(json.dumps({"images": len(names), "loop_seconds": seconds}), encoding="utf-8")
    print(f"scored {len(names):,} images one at a time: {len(names) / seconds:,.1f} img/s in the loop")


if __name__ == "__main__":
    main()

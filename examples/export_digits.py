"""Write scikit-learn's 1,797 handwritten digits (8x8, shipped inside the package) as an image folder.

A dataset the project never trains on elsewhere, in the layout `--dataset imagefolder` reads:
OUT/train/<digit>/*.png and OUT/test/<digit>/*.png (a seeded, stratified 80/20 split).

    python examples/export_digits.py data/digits
    sfprompt run --dataset imagefolder --data-dir data/digits
"""

import argparse
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    digits = load_digits()
    rng = np.random.default_rng(args.seed)
    for label in range(10):
        members = rng.permutation(np.flatnonzero(digits.target == label))
        cut = int(round(0.8 * len(members)))
        for split, chosen in (("train", members[:cut]), ("test", members[cut:])):
            folder = args.out / split / str(label)
            folder.mkdir(parents=True, exist_ok=True)
            for index in chosen:
                pixels = (digits.images[index] * (255 / 16)).astype(np.uint8)  # values 0..16
                Image.fromarray(pixels, mode="L").save(folder / f"{index}.png")
    print(f"wrote {len(digits.target)} images to {args.out}/train and {args.out}/test")


if __name__ == "__main__":
    main()

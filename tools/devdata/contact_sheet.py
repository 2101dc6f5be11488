"""Tile a few images into one PNG contact sheet, for eyeballing a family (sanity check only).

python tools/devdata/contact_sheet.py OUT.png IMG [IMG ...] [--size 192 --cols 6]
"""

import argparse

from PIL import Image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("images", nargs="+")
    parser.add_argument("--size", type=int, default=192)
    parser.add_argument("--cols", type=int, default=6)
    args = parser.parse_args()
    rows = (len(args.images) + args.cols - 1) // args.cols
    sheet = Image.new("RGB", (args.cols * args.size, rows * args.size), "white")
    for k, path in enumerate(args.images):
        image = Image.open(path).convert("RGB")
        image.thumbnail((args.size, args.size))
        sheet.paste(image, ((k % args.cols) * args.size, (k // args.cols) * args.size))
    sheet.save(args.out)


if __name__ == "__main__":
    main()

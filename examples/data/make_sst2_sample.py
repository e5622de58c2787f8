"""Rebuild examples/data/sst2_sample/ from the full SST-2 (a folder with train.tsv, dev.tsv, test.tsv: what
examples/get_sst2.py writes into examples/data/sst2/).

    python examples/data/make_sst2_sample.py --src examples/data/sst2 --out examples/data/sst2_sample

The committed sample was drawn from this project's copy of SST-2 (see sst2_sample/README.md); the same rows come
back from a source whose files hold the same rows in the same order.

Rows are drawn uniformly without replacement with random.Random(SEED), kept in their original order, header and
columns unchanged.
"""

import argparse
import os
import random

SIZES = {"train.tsv": 2000, "dev.tsv": 200, "test.tsv": 300}
SEED = 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "sst2"))
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "sst2_sample"))
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    for name, size in SIZES.items():
        with open(os.path.join(args.src, name), encoding="utf-8") as f:
            header, *rows = f.read().splitlines()
        keep = sorted(random.Random(SEED).sample(range(len(rows)), size))
        with open(os.path.join(args.out, name), "w", encoding="utf-8") as f:
            f.write("\n".join([header] + [rows[i] for i in keep]) + "\n")
        print(f"{name}: {size} of {len(rows)} rows")


if __name__ == "__main__":
    main()

"""Download the full SST-2 and write it as the examples read it: ``train.tsv``, ``dev.tsv``, ``test.tsv``.

    pip install datasets                       # the Hugging Face `datasets` library (not needed for anything else)
    python examples/get_sst2.py                # -> examples/data/sst2/ (git-ignored)
    python examples/sst2_cli.py fit --config examples/configs/fgm.yaml --data.data_dir examples/data/sst2

Needs network access to the Hugging Face Hub, once; everything after it runs offline. Sources:

* ``train.tsv`` (67,349 sentences) and ``dev.tsv`` (872): the GLUE SST-2 train and validation splits
  (``nyu-mll/glue``, config ``sst2``). GLUE's own test split has no labels;
* ``test.tsv`` (1,821): the labelled test split of the binary SST (``SetFit/sst2``, split ``test``).

Written in the layout of the committed sample (``examples/data/sst2_sample/``): tab-separated, one header line,
``label`` (0 negative, 1 positive) first, then ``sentence`` (train) or ``content`` (dev, test); tabs and line breaks
inside a sentence become spaces. On a machine without network access the script stops with a message saying so.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUT = os.path.join(HERE, "data", "sst2")

# split file -> (dataset, config, split, text column, header of the text column, expected rows)
SOURCES: Dict[str, Tuple[str, Optional[str], str, str, str, int]] = {
    "train.tsv": ("nyu-mll/glue", "sst2", "train", "sentence", "sentence", 67349),
    "dev.tsv": ("nyu-mll/glue", "sst2", "validation", "sentence", "content", 872),
    "test.tsv": ("SetFit/sst2", None, "test", "text", "content", 1821),
}
_OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")


class DownloadError(RuntimeError):
    """SST-2 could not be fetched (no network, no ``datasets``); the message says what to do."""


def clean(text: str) -> str:
    """One TSV field: tabs and line breaks become spaces, surrounding spaces dropped.

    >>> clean("a\\tgood\\nfilm ")
    'a good film'
    """
    return text.replace("\t", " ").replace("\r", " ").replace("\n", " ").strip()


def write_tsv(rows: Iterable[Mapping[str, Any]], path: str, text_key: str, text_header: str) -> int:
    """Write ``rows`` (mappings with ``label`` and ``text_key``) as ``label<TAB><text_header>`` TSV; return the count.

    Raises:
        ValueError: a label that is not 0 or 1 (GLUE's unlabelled test split has -1), or an empty text.
    """
    lines = [f"label\t{text_header}"]
    for n, row in enumerate(rows):
        label, text = int(row["label"]), clean(str(row[text_key]))
        if label not in (0, 1):
            raise ValueError(f"{os.path.basename(path)}, row {n}: label {label!r} is not 0 or 1 (an unlabelled split?).")
        if not text:
            raise ValueError(f"{os.path.basename(path)}, row {n}: the text is empty.")
        lines.append(f"{label}\t{text}")
    tmp = path + ".part"
    with open(tmp, "w", encoding="utf-8", newline="\n") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(tmp, path)  # no half-written file on an error
    return len(lines) - 1


def _offline_hint() -> str:
    set_vars = [f"{v}={os.environ[v]}" for v in _OFFLINE_VARIABLES if os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")]
    if set_vars:
        return f" The environment asks for offline mode ({', '.join(set_vars)}): unset it for this command."
    return ""


def default_loader() -> Callable[..., Any]:
    """``datasets.load_dataset``, or a :class:`DownloadError` saying how to install it."""
    try:
        from datasets import load_dataset
    except ImportError as err:
        raise DownloadError(
            "get_sst2 needs the Hugging Face `datasets` library to download SST-2: `pip install datasets`, then run "
            "it again (with network access). Or copy train.tsv, dev.tsv and test.tsv of SST-2 into a folder yourself "
            "(format: see examples/data/sst2_sample/README.md) and pass it as --data.data_dir."
        ) from err
    return load_dataset


def download(out: str, load_dataset: Optional[Callable[..., Any]] = None, expect_sizes: bool = True) -> Dict[str, int]:
    """Fetch the three splits with ``load_dataset`` (default: ``datasets.load_dataset``) and write them into ``out``.

    Returns the rows written per file. Raises :class:`DownloadError` when a split cannot be fetched (offline: the
    message says so) and ``ValueError`` when one does not look like SST-2 (``expect_sizes``: the known row counts).
    """
    load = load_dataset or default_loader()
    os.makedirs(out, exist_ok=True)
    cache: Dict[Tuple[str, Optional[str], str], Any] = {}
    written: Dict[str, int] = {}
    for name, (dataset, config, split, text_key, text_header, size) in SOURCES.items():
        key = (dataset, config, split)
        if key not in cache:
            args = (dataset, config) if config else (dataset,)
            try:
                cache[key] = load(*args, split=split)
            except Exception as err:  # noqa: BLE001 - datasets/huggingface_hub raise many kinds; all mean "not fetched"
                raise DownloadError(
                    f"get_sst2: could not download {dataset}{'/' + config if config else ''} (split {split}) from the Hugging "
                    f"Face Hub: {type(err).__name__}: {err}\nThis step needs network access (once).{_offline_hint()} Run it on "
                    "a machine that has it and copy the folder, or put train.tsv, dev.tsv and test.tsv of SST-2 into a folder "
                    "yourself (format: examples/data/sst2_sample/README.md); the committed sample "
                    "(examples/data/sst2_sample/, the default) needs nothing."
                ) from err
        rows = cache[key]
        columns = set(getattr(rows, "column_names", None) or (rows[0].keys() if len(rows) else ()))
        if not {"label", text_key} <= columns:
            raise ValueError(f"get_sst2: {dataset} split {split} has columns {sorted(columns)}; expected 'label' and {text_key!r}.")
        count = write_tsv(rows, os.path.join(out, name), text_key, text_header)
        if expect_sizes and count != size:
            raise ValueError(f"get_sst2: {dataset} split {split} has {count:,} rows; SST-2's has {size:,}.")
        written[name] = count
    return written


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=DEFAULT_OUT, help="folder for train.tsv, dev.tsv, test.tsv (default: examples/data/sst2)")
    args = parser.parse_args(argv)
    try:
        written = download(args.out)
    except DownloadError as err:
        print(err, file=sys.stderr)
        return 1
    for name, count in written.items():
        print(f"{os.path.join(args.out, name)}: {count:,} sentences")
    print(f"Use it with --data.data_dir {os.path.relpath(args.out)} (sst2_cli.py) or --data_dir (sst2_demo.py).")
    return 0


if __name__ == "__main__":
    sys.exit(main())

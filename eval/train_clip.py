"""Train the in-domain reference CLIP: the command line of mmdit.clip_train (its docstring and `--help` are the
user doc).

    python eval/train_clip.py --data configs/shapes.yaml --out DIR [data.key=value ...] [--steps 1200 ...]
"""
import sys

from mmdit.clip_train import cli

if __name__ == "__main__":
    sys.exit(cli())

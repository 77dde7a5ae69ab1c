"""Evaluate a trained run: the command line of mmdit.evaluate (its docstring and `--help` are the user doc).

    python eval/eval.py --model runs/shapes --out DIR [--metrics fid,clip,composition,recon] ...
    accelerate launch eval/eval.py ...    # sampling sharded across processes
"""
import sys

from mmdit.evaluate import cli

if __name__ == "__main__":
    sys.exit(cli())

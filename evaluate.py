"""Evaluate a trained run: python evaluate.py --run runs/<name> --data <dir> [--split test]"""

import sys

from kfundus.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))

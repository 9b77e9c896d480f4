"""Train a kfundus model: python train.py --config <shipped config or YAML> --data <dir> [--set key=value]"""

import sys

from kfundus.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))

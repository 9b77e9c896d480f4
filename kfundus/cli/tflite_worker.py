"""The child process of a TFLite conversion (``kfundus.deploy.tflite.convert_tflite`` starts
it; not a user command): ``python -m kfundus.cli.tflite_worker SAVED_MODEL OUT QUANTIZATION
[CALIBRATION.npz]``. The converter keeps its memory until its process ends."""

import json
import sys

from kfundus.errors import KfundusError


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) not in (3, 4):
        print(__doc__, file=sys.stderr)
        return 2
    from kfundus.deploy.tflite import ERROR_TAG, convert_here

    try:
        out = convert_here(argv[0], argv[1], argv[2], argv[3] if len(argv) == 4 else None)
    except KfundusError as err:
        print(ERROR_TAG + json.dumps({"message": str(err)}), file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

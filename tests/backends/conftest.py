"""The backend matrix runs only with ``make test-backends`` (it needs JAX, installed in a
separate venv, and takes minutes): ``pytest tests`` does not collect it unless
``KFUNDUS_BACKEND_MATRIX=1``."""

import os

collect_ignore = [] if os.environ.get("KFUNDUS_BACKEND_MATRIX") == "1" else ["test_backends.py"]

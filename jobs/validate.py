"""``python jobs/validate.py ...``: the same as ``mimo-validate`` (see :mod:`mimo_ray.cli.validate`).

Run from the repository root with the package installed (``pip install -e .``); ``ray job submit --working-dir .
-- python jobs/validate.py`` puts the working dir on the path.
"""

import sys

from mimo_ray.cli.validate import main

if __name__ == "__main__":
    sys.exit(main())

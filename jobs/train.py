"""``python jobs/train.py ...``: the same as ``mimo-train`` (see :mod:`mimo_ray.cli.train`).

Run from the repository root with the package installed (``pip install -e .``); ``ray job submit --working-dir .
-- python jobs/train.py`` puts the working dir on the path.
"""

from mimo_ray.cli.train import main

if __name__ == "__main__":
    main()

"""``python jobs/bench.py ...``: the same as ``mimo-bench`` (see :mod:`mimo_ray.cli.bench`).

Run from the repository root with the package installed (``pip install -e .``); ``ray job submit --working-dir .
-- python jobs/bench.py`` puts the working dir on the path.
"""

from mimo_ray.cli.bench import main

if __name__ == "__main__":
    main()

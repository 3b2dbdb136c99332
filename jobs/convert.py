"""``python jobs/convert.py ...``: the same as ``mimo-convert`` (see :mod:`mimo_ray.cli.convert`).

Run from the repository root with the package installed (``pip install -e .``); ``ray job submit --working-dir .
-- python jobs/convert.py`` puts the working dir on the path.
"""

from mimo_ray.cli.convert import main

if __name__ == "__main__":
    main()

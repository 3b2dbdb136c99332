"""``python jobs/infer.py ...``: the same as ``mimo-infer`` (see :mod:`mimo_ray.cli.infer`).

Run from the repository root with the package installed (``pip install -e .``); ``ray job submit --working-dir .
-- python jobs/infer.py`` puts the working dir on the path.
"""

from mimo_ray.cli.infer import main

if __name__ == "__main__":
    main()

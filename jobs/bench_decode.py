"""``python jobs/bench_decode.py ...``: the same as ``mimo-bench-decode`` (see :mod:`mimo_ray.cli.bench_decode`).

Run from the repository root with the package installed (``pip install -e .``); ``ray job submit --working-dir .
-- python jobs/bench_decode.py`` puts the working dir on the path.
"""

from mimo_ray.cli.bench_decode import main

if __name__ == "__main__":
    main()

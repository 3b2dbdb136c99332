"""Job entry points (``mimo-train``, ``mimo-infer``, ``mimo-convert``, ``mimo-validate``, ``mimo-bench``).

``jobs/<job>.py`` are thin files that call the same ``main``.
"""

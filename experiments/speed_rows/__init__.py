"""The measurements of ``experiments/speed.py``, one module per row family.

``timing`` (interleaved repeats, medians, table rows) and ``settings`` (sizes, seeded models, generated
scenes) are shared; ``cam``, ``rivals``, ``train``, ``precision``, ``data``, ``metrics``, ``crf``, ``bench``,
``glibc`` and ``cuda`` each define one phase ``phase_NAME`` returning ``{"rows", "info", "skipped"}``;
``child`` runs a phase in its own interpreter and ``report`` writes speed.json / speed.md.
"""

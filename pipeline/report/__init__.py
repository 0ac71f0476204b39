"""The run report: pictures (``figures``), the markdown report (``markdown``) and its self-contained HTML twin
(``html``), built from a run folder (``build``).
"""

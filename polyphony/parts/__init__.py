"""Full-parts evaluation: does every requested instrument play a real part?

Measured on held-out band pieces (the validation and test splits' ``band`` source), cut into
16-bar excerpts, against what those excerpts really play. Four checks, each a function:

* :func:`requests_from_excerpts`: generate each excerpt's own instrument set (default
  densities), compare notes per bar per part and per family, thin parts, PCE/SC/GC, fidelity,
  and how a part repeats itself (``pitch_recurrence``: its pitches heard again 4 bars later);
* :func:`control`: ``sparse`` < ``medium`` < ``dense`` and a numeric request, per instrument;
* :func:`continuation`: prompt tracks keep playing after the prompt;
* :func:`arrangement`: added bass and drums land near their target density.

``scripts/evaluate_model.py --parts`` runs them and prints the tables (docs/generation.md).
What is measured on scores lives in ``figures``, the checks that generate in ``checks``, the
text report in ``report``.
"""

from .checks import ASKED, arrangement, continuation, control, requests_from_excerpts
from .figures import (
    HELD_OUT,
    MUSIC_METRICS,
    REPORT_FAMILIES,
    THIN,
    band_excerpts,
    excerpt,
    family_medians,
    gap_intervals,
    instruments_of,
    part_figures,
    report_family,
    share_gaps,
)
from .report import format_report

__all__ = [
    "ASKED",
    "HELD_OUT",
    "MUSIC_METRICS",
    "REPORT_FAMILIES",
    "THIN",
    "arrangement",
    "band_excerpts",
    "continuation",
    "control",
    "excerpt",
    "family_medians",
    "format_report",
    "gap_intervals",
    "instruments_of",
    "part_figures",
    "report_family",
    "requests_from_excerpts",
    "share_gaps",
]

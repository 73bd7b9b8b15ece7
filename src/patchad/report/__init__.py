"""The comparison report: one self-contained HTML page rendered from a benchmark folder.

``write_report(DIR)`` reads the files ``patchad benchmark --out DIR`` writes (``results.json``,
``runs/_images/<category>.npz``, ``runs/<method>/<category>/predictions.npz`` and ``curves.json``)
and writes ``DIR/report.html``. Nothing is recomputed from images or models: every number and every
"pros and cons" sentence is derived from those files. Images are embedded as base64 PNG data URIs;
the page loads nothing from the network (a Content-Security-Policy forbids it) and needs no script.

Modules, by concern:
    data       the folder read into the structures the page needs (``load_results``, ``assemble``)
    sentences  the "pros and cons" text, computed from the numbers
    charts     matplotlib figures and heat-map pictures as PNG data URIs
    gallery    the picture tables: gallery and alignment experiment
    page       the page template and style, the other sections, ``render_report``, ``write_report``
"""

from patchad.report.data import COSTS, METRICS, load_results
from patchad.report.gallery import GALLERY_PER_TYPE, SHIFT_PICTURES
from patchad.report.page import CSS, render_report, write_report
from patchad.report.sentences import SMALL_DEFECT

__all__ = [
    "COSTS",
    "CSS",
    "GALLERY_PER_TYPE",
    "METRICS",
    "SHIFT_PICTURES",
    "SMALL_DEFECT",
    "load_results",
    "render_report",
    "write_report",
]

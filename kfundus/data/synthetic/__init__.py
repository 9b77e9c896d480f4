"""Synthetic retinal datasets whose lesions encode their labels, in the public layouts.

Seeded, numpy + Pillow only. ``render`` draws one colour fundus photograph (anatomy,
lesions, their masks); ``fundus`` writes ODIR-5K, RFMiD and DR-grading layouts; ``oct``
the Kermany OCT layout; ``hr`` the CGI-HRDC hypertension layout. ``kfundus synth`` is the
command line.
"""

from kfundus.data.synthetic.fundus import load_masks, make_arrays, make_dr, make_odir, make_rfmid, render_dr_grade
from kfundus.data.synthetic.hr import make_hrdc, render_hr_eye
from kfundus.data.synthetic.oct import make_oct, render_bscan
from kfundus.data.synthetic.render import render_eye

__all__ = [
    "load_masks",
    "make_arrays",
    "make_dr",
    "make_hrdc",
    "make_oct",
    "make_odir",
    "make_rfmid",
    "render_bscan",
    "render_dr_grade",
    "render_eye",
    "render_hr_eye",
]

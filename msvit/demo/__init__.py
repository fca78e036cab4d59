"""``make demo`` (``python -m msvit.demo``): the shipped cluttered-digits model on held-out
digits and on real photos, with timings and the gate's masks drawn (``run``)."""

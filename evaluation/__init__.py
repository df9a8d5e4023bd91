"""faststyle's measuring library: training runs and their labels (runs.py), held-out photos (held_out.py), measures
on them (measures.py: losses, contrast invariance; PSNR is core.metrics), the flicker measure (warping.py: the
warping error, flows, masks) on test clips (clips.py), and the reports' figures (figures.py). No command lines here:
the reports on top of it are in evaluation/reports/ and run as ``python -m evaluation NAME`` (__main__.py)."""

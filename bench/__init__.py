"""`make bench` (`python -m bench`): hpcnlp against the HF example recipes, same model, data and steps.

Every configuration runs in a fresh subprocess (`python -m bench.worker`), so each peak RSS is its
own. Results: bench/results/summary.json (with `ratios`), summary.md, *.png.
"""

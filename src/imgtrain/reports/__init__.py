"""Reports a person opens in a browser: self-contained HTML pages with the run's plots and images inlined.

``training.py`` writes a trained model's report.html, ``evaluation.py`` Evaluate Model's, and
``combined.py`` puts both on one page for ``imgtrain report``. Plots are matplotlib figures,
images are PNG data URIs: a page fetches nothing and reads without JavaScript. Nothing here
needs torch.
"""

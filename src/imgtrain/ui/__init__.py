"""imgtrain ui: the designer's modules in a browser, served from this machine.

- ``workspace.py``: the folder that holds what the page makes (data sets, runs) and the rule of which paths
  a request may reach: the workspace and the folders given with ``--data``, nothing else.
- ``jobs.py``: the background processes that convert, train, score and evaluate: each runs the CLI's own
  commands (``python -m imgtrain ...``), so the page and the command line cannot drift; a job outlives the page.
- ``app.py``: the Starlette application (the stack ``imgtrain serve`` uses), its token, and ``run_ui``.
- ``static/``: the page: HTML, CSS and JavaScript shipped in the package, nothing fetched from elsewhere.
"""

"""The tuning loop between the CLI and the packages below it.

- ``study``: ``Study``, the one encoding of a trial (its config, measurement and
  predictions) in Optuna storage, read and written by every driver.
- ``sources``: where measurements come from: ``LiveSource`` (the reference trainer),
  ``ReplaySource`` (a recorded table), ``Recorded`` (trials a study already holds).
- ``strategies``: the ``Strategy`` interface (ask for configs given the trials so far, tell
  it results), every search behind it, and ``drive``, which runs one against a budget.
- ``run``: ``autotune run`` start to end; ``workers``: ``autotune worker``, the same study
  shared by processes on many machines; ``verdict``: the finalists measured again,
  interleaved, with bootstrap intervals; ``plan``: ``--plan-only``; ``report``: report.md.
- ``rundir``: the run directory's files, each path named once.
"""

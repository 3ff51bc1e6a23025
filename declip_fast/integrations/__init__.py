"""Other projects' programs, run with declip_fast's pieces in place of theirs.

- ``python -m declip_fast.integrations.open_clip_train <open_clip_train.main's arguments>``:
  OpenCLIP's trainer with our losses (``open_clip_train``).

Importing this package imports nothing else; each module imports its host project when it runs.
"""

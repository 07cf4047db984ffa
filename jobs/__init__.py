"""The entry points users run (`python jobs/NAME.py` or `python -m jobs.NAME`): each parses its
typed options, prepares (every check before any model loads), runs, and prints."""

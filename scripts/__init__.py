"""What users run from the Makefile (`python -m scripts.NAME`): seeds, bench, browser_check; and the pieces
every tool shares (experiments, measure, pipeline_repo)."""

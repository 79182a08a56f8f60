"""The research harness (`python -m research.NAME` from the repository root): short drivers of the stages'
library calls that train many settings into one JSON (study), and airbench94 on the same data."""
